"""What verl runs of ours, reached only through verl's plugin points (never by patching verl):

* :mod:`~ctpo_cli.train.verl.plugin`: the ``verl.plugins`` entry point; registers the ``ctpo/*`` losses.
* :mod:`~ctpo_cli.train.verl.tools`: the sandbox tool, its parser and agent loop for the ```python protocol.
* :mod:`~ctpo_cli.train.verl.reward`: the reward function (``reward.custom_reward_function``).

Importing this package imports nothing of verl; its modules do.
"""
