"""``ctpo theory``: the paper's Table 1 computed exactly on small problems (:mod:`~ctpo_cli.theory.exact`)
and its figure (:mod:`~ctpo_cli.theory.figure`); docs/method.md section 4."""
