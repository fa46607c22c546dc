"""Experiment files -> one verl job: compose with OmegaConf, turn into verl overrides, validate with verl.

An experiment is a stack of YAML files under ``experiments/`` (see ``experiments/base.yaml``)::

    base.yaml -> tir/<ctpo.tir>.yaml -> reward/<ctpo.reward>.yaml -> method/<method>.yaml
      -> model/<preset>.yaml -> each -e FILE -> --seed -> key=value ...

merged with OmegaConf, later layers winning. The tool protocol and reward files are chosen by
``ctpo.tir`` and ``ctpo.reward`` as every other layer sets them (default ``authors``, the authors'
released run), so ``ctpo.tir=ctpo`` on the command line selects ``tir/ctpo.yaml`` and the files and
overrides after it still win over it. The ``ctpo:`` section holds the launcher's settings and the
loss fields verl's schema lacks (:class:`CtpoSection`, checked strictly); every other key is verl's own
(``verl/trainer/config/ppo_trainer.yaml``). :func:`build_job` turns the composed experiment into the
``key=value`` overrides of ``python -m verl.trainer.main_ppo``, composes verl's own Hydra config with
them exactly as ``main_ppo`` does, and runs verl's ``validate_config`` plus checks of our extensions
(loss, tool parser, agent loop, tool classes). Composition is offline and works on CPU; validation
imports verl (seconds), so the CLI imports this module lazily.

Bad input (malformed YAML, a missing file, an unknown key, a wrong type, a value verl rejects) raises
ValueError or FileNotFoundError with a one-line message naming the problem, where it was set and the
valid choices; ``ctpo`` shows it as one red line.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import dataset
import experiments
from ctpo_cli.algo.losses import METHODS, get_method, method_hparams
from ctpo_cli.errors import BackendUnavailable, ConfigError, InputFileError
from ctpo_cli.runs import rundir
from ctpo_cli.train import synthetic
from ctpo_cli.train.synthetic import SyntheticSection

EXPERIMENTS_DIR = experiments.directory()
BASE_FILE = "base.yaml"
METHOD_DIR = "method"
MODEL_DIR = "model"
TIR_DIR = "tir"
REWARD_DIR = "reward"
DEFAULT_MODEL = "Qwen3-14B"
"""The paper's larger model (docs/method.md), the default of ``ctpo train`` on verl."""

LOSS_PREFIX = "actor_rollout_ref.actor.policy_loss."
LOSS_MODE_PREFIX = "ctpo/"
DATA_PATH_KEYS = ("data.train_files", "data.val_files")
"""Keys holding data files: made absolute (Ray workers need not share our working directory)."""
VERL_ENTRY = "verl.trainer.main_ppo"
PLATFORMS = ("cuda", "cpu")
"""``ctpo.platform``: GPUs with vLLM, or this machine's CPU (``ctpo_cli.train.verl.cpu``)."""


@dataclass
class SandboxSection:
    """Where the tool's code runs: ``url`` of a running service, or None to start one per run."""

    url: str | None = None


@dataclass
class CtpoSection:
    """The ``ctpo:`` section of an experiment (unknown keys and wrong types are errors)."""

    method: str = MISSING
    model: str = MISSING
    seed: int = 0
    loss: dict[str, float] = field(default_factory=dict)
    run_name: str = ""
    run_dir: str = ""
    experiments_dir: str = ""
    dataset_dir: str = ""
    resume_step: int = 0
    """Filled in by ``ctpo train --resume``: the step of the verl checkpoint the run continues from."""
    tir: str = "authors"
    """Tool protocol (``experiments/tir/<tir>.yaml``, ``ctpo_cli.tir.protocol.TIR_PROTOCOLS``)."""
    reward: str = "authors"
    """Reward rule (``experiments/reward/<reward>.yaml``, ``ctpo_cli.tir.scoring.REWARDS``)."""
    platform: str = "cuda"
    """Where verl runs: ``cuda`` (GPUs, vLLM rollout) or ``cpu`` (ctpo's CPU platform and transformers
    rollout, ``ctpo_cli.train.verl.cpu``; set by the ``tiny-cpu`` preset)."""
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass(frozen=True)
class Layer:
    """One step of the composition: a file, a command-line option or the ``key=value`` overrides."""

    source: str
    config: DictConfig


@dataclass(frozen=True)
class Experiment:
    """A composed, resolved experiment: the ``ctpo`` section and verl's keys, with where each came from."""

    ctpo: CtpoSection
    verl: dict[str, Any]
    sources: dict[str, str]
    files: tuple[Path, ...]
    passthrough: tuple[str, ...] = ()
    """``+key=value`` / ``~key`` command-line overrides, handed to verl verbatim."""

    @property
    def run_dir(self) -> Path:
        return Path(self.ctpo.run_dir)


@dataclass(frozen=True)
class VerlJob:
    """What ``ctpo train`` launches: verl's overrides, the config they compose to, the loss hyperparameters."""

    experiment: Experiment
    overrides: list[str]
    config: DictConfig
    hparams: dict[str, float]

    @property
    def command(self) -> list[str]:
        """``python -m verl.trainer.main_ppo <overrides>`` with this interpreter."""
        return [sys.executable, "-m", VERL_ENTRY, *self.overrides]


# --------------------------------------------------------------------------------------------------
# Composing the experiment


def compose_experiment(
    method: str,
    model: str | None = None,
    seed: int | None = None,
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    runs_dir: str | Path = rundir.RUNS_DIR,
    experiments_dir: Path = EXPERIMENTS_DIR,
    run_name: str | None = None,
    resume_step: int = 0,
) -> Experiment:
    """Compose base, method, model preset, extra files, seed and ``key=value`` overrides, then resolve.

    ``model`` is a preset name (``Qwen3-14B`` -> ``model/qwen3-14b.yaml``), a preset file, or a model
    path / Hugging Face id (the base layout with ``actor_rollout_ref.model.path`` set); None means
    :data:`DEFAULT_MODEL`. ``run_name``: the name of an existing run to continue (default: a new one),
    from its verl checkpoint of step ``resume_step``.
    """
    get_method(method)
    plain, passthrough = _split_overrides(overrides)
    layers = [
        _file_layer(_method_file(method, experiments_dir), experiments_dir),
        _model_layer(model or DEFAULT_MODEL, experiments_dir),
        *(_file_layer(Path(f), experiments_dir) for f in files),
    ]
    if seed is not None:
        layers.append(Layer("--seed", OmegaConf.create({"ctpo": {"seed": seed}})))
    if resume_step:
        layers.append(Layer("--resume", OmegaConf.create({"ctpo": {"resume_step": resume_step}})))
    if plain:
        layers.append(Layer("command line", _dotlist(plain)))
    base = _file_layer(experiments_dir / BASE_FILE, experiments_dir)
    chosen, _ = _merge([base, *layers])
    merged, sources = _merge([base, *_choice_layers(chosen.ctpo, experiments_dir), *layers])
    _name_run(merged, Path(runs_dir), experiments_dir, run_name)
    ctpo, verl = _resolve(merged)
    _check_method(ctpo, method, verl, sources)
    files_used = tuple(Path(s) for s in dict.fromkeys(sources.values()) if s.endswith((".yaml", ".yml")))
    return Experiment(ctpo, verl, sources, files_used, tuple(passthrough))


def _choice_layers(ctpo: DictConfig, experiments_dir: Path) -> list[Layer]:
    """The tool-protocol and reward files that ``ctpo.tir`` and ``ctpo.reward`` name."""
    layers = []
    for key, folder in (("tir", TIR_DIR), ("reward", REWARD_DIR)):
        name = str(ctpo[key])
        choices = sorted(p.stem for p in (experiments_dir / folder).glob("*.yaml"))
        if name not in choices:
            raise ConfigError(f"ctpo.{key} is {name!r}; choose one of {', '.join(choices)}")
        layers.append(_file_layer(experiments_dir / folder / f"{name}.yaml", experiments_dir))
    return layers


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items for the experiment; ``+key=value`` and ``~key`` go to verl verbatim."""
    plain: list[str] = []
    passthrough: list[str] = []
    for item in overrides:
        if item.startswith(("+", "~")):
            passthrough.append(item)
        elif "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value (e.g. data.train_batch_size=64)")
        else:
            plain.append(item)
    return plain, passthrough


def _dotlist(items: list[str]) -> DictConfig:
    try:
        return OmegaConf.from_dotlist(items)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"bad override on the command line: {_one_line(error)}") from None


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    absolute = path.resolve()
    with contextlib.suppress(ValueError):
        return str(absolute.relative_to(Path.cwd()))
    return str(absolute)


def _file_layer(path: Path, experiments_dir: Path) -> Layer:
    """One YAML file as a layer; one-line errors for a missing, malformed or non-mapping file."""
    if not path.is_file():
        raise InputFileError(f"experiment file {path} not found (experiments are in {experiments_dir})")
    try:
        config = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"malformed YAML in {path}: {_yaml_problem(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid experiment file {path}: {_one_line(error)}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"experiment file {path} must be a mapping of keys, not a list")
    return Layer(_display(path), config)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``<problem> at line L, column C`` for a YAML syntax error."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _one_line(error)


def _method_file(method: str, experiments_dir: Path) -> Path:
    return experiments_dir / METHOD_DIR / f"{method}.yaml"


def model_presets(experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    """The model preset names (file stems of ``experiments/model/*.yaml``)."""
    return sorted(p.stem for p in (experiments_dir / MODEL_DIR).glob("*.yaml"))


def _model_layer(model: str, experiments_dir: Path) -> Layer:
    """A preset name or file, else a model path / Hugging Face id on the base layout."""
    if model.endswith((".yaml", ".yml")):
        return _file_layer(Path(model), experiments_dir)
    preset = experiments_dir / MODEL_DIR / f"{model.lower()}.yaml"
    if preset.is_file():
        return _file_layer(preset, experiments_dir)
    if "/" not in model and not Path(model).exists():
        raise ConfigError(
            f"unknown model preset {model!r}; presets: {', '.join(model_presets(experiments_dir))} "
            "(or a model directory or Hugging Face id such as Qwen/Qwen3-8B)"
        )
    config = {"ctpo": {"model": Path(model).name}, "actor_rollout_ref": {"model": {"path": model}}}
    return Layer("--model", OmegaConf.create(config))


def _merge(layers: Sequence[Layer]) -> tuple[DictConfig, dict[str, str]]:
    """Merge the layers over a strict ``ctpo`` schema; remember which layer set each verl key last."""
    merged = OmegaConf.create({"ctpo": OmegaConf.structured(CtpoSection)})
    sources: dict[str, str] = {}
    for layer in layers:
        try:
            result = OmegaConf.merge(merged, layer.config)
        except OmegaConfBaseException as error:
            raise ConfigError(_ctpo_key_error(error, layer.source)) from None
        assert isinstance(result, DictConfig)
        merged = result
        for key in _leaf_keys(OmegaConf.to_container(layer.config, resolve=False)):
            sources[key] = layer.source
    return merged, sources


def _ctpo_key_error(error: OmegaConfBaseException, source: str) -> str:
    key = getattr(error, "full_key", None) or "?"
    if "not in" in str(error):
        fields = ", ".join(f"ctpo.{name}" for name in CtpoSection.__dataclass_fields__)
        return f"unknown key {key!r} (from {source}); the ctpo section has {fields}"
    return f"bad value for {key!r} (from {source}): {_one_line(error)}"


def _leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_keys(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1]


def _name_run(merged: DictConfig, runs_dir: Path, experiments_dir: Path, name: str | None) -> None:
    """Fill ``ctpo.run_name``, ``ctpo.run_dir``, ``ctpo.experiments_dir`` and ``ctpo.dataset_dir`` (the
    shipped competition sets), all used by interpolations."""
    try:
        name = name or rundir.run_name(merged.ctpo.method, merged.ctpo.model, merged.ctpo.seed)
    except OmegaConfBaseException as error:
        raise ConfigError(f"incomplete experiment: {_one_line(error)}") from None
    merged.ctpo.run_name = name
    merged.ctpo.run_dir = str((runs_dir / name).resolve())
    merged.ctpo.experiments_dir = str(experiments_dir.resolve())
    merged.ctpo.dataset_dir = str(dataset.shipped_dir().resolve())
    local_preset = merged.ctpo.synthetic.local_preset
    if local_preset is not None:
        found = synthetic.paths(
            local_preset, merged.ctpo.synthetic.train_problems, merged.ctpo.seed, runs_dir
        )
        for key, value in found.items():
            merged.ctpo.synthetic[key] = value


def _resolve(merged: DictConfig) -> tuple[CtpoSection, dict[str, Any]]:
    """Resolve interpolations; split into the typed ctpo section and verl's plain tree."""
    try:
        tree = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        if "Missing mandatory value" in str(error):
            raise ConfigError(
                f"experiment leaves {key!r} unset (???): set it in a file or as {key}=..."
            ) from None
        raise ConfigError(f"cannot resolve {key!r}: {_one_line(error)}") from None
    assert isinstance(tree, dict)
    ctpo = OmegaConf.to_object(merged.ctpo)
    assert isinstance(ctpo, CtpoSection)
    if ctpo.platform not in PLATFORMS:
        raise ConfigError(f"ctpo.platform must be one of {', '.join(PLATFORMS)}, got {ctpo.platform!r}")
    verl = {str(k): v for k, v in tree.items() if k != "ctpo"}
    _absolute_data_paths(verl)
    return ctpo, verl


def _absolute_data_paths(verl: dict[str, Any]) -> None:
    for key in DATA_PATH_KEYS:
        parent, _, leaf = key.rpartition(".")
        section = verl.get(parent)
        if not isinstance(section, dict) or section.get(leaf) is None:
            continue
        value = section[leaf]
        paths = value if isinstance(value, list) else [value]
        absolute = [str(Path(p).expanduser().resolve()) for p in paths]
        section[leaf] = absolute if isinstance(value, list) else absolute[0]


def _check_method(ctpo: CtpoSection, method: str, verl: dict[str, Any], sources: Mapping[str, str]) -> None:
    """The experiment's method, loss mode and ``ctpo.loss`` fields must agree with ``--method``."""
    if ctpo.method != method:
        raise ConfigError(f"ctpo.method is {ctpo.method!r} but --method is {method!r}")
    loss_mode = _get(verl, LOSS_PREFIX + "loss_mode")
    if loss_mode != LOSS_MODE_PREFIX + method:
        where = sources.get(LOSS_PREFIX + "loss_mode", "verl's defaults")
        raise ConfigError(
            f"{LOSS_PREFIX}loss_mode is {loss_mode!r} (from {where}) but the method is {method!r}: "
            f"expected {LOSS_MODE_PREFIX}{method}"
        )
    fields = [key for key in METHODS[method].defaults if key.startswith("ctpo_")]
    unknown = sorted(set(ctpo.loss) - set(fields))
    if unknown:
        valid = ", ".join(fields) if fields else "none (its clip is actor_rollout_ref.actor.clip_ratio_*)"
        raise ConfigError(f"ctpo.loss.{unknown[0]} is not a field of method {method!r}; its fields: {valid}")


_ABSENT = object()


def _get(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------------
# Experiment -> verl overrides


def verl_config_dir() -> Path:
    """verl's Hydra config directory (found without importing verl)."""
    spec = find_spec("verl")
    if spec is None or spec.origin is None:
        raise BackendUnavailable(
            "verl is not installed: pip install 'ctpo[verl]' to compose or launch verl jobs "
            "(or train here with --backend local)"
        )
    return Path(spec.origin).parent / "trainer" / "config"


def compose_verl(overrides: Sequence[str]) -> DictConfig:
    """verl's ``ppo_trainer`` config with ``overrides``, as ``main_ppo`` composes it (~0.5 s, no verl import)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


@cache
def verl_defaults() -> dict[str, Any]:
    """verl's default config as a plain tree (interpolations left as strings)."""
    tree = OmegaConf.to_container(compose_verl([]), resolve=False)
    assert isinstance(tree, dict)
    return {str(key): value for key, value in tree.items()}


def minibatches_per_step(verl: Mapping[str, Any]) -> int:
    """Optimizer steps per training step: ppo_epochs x train_batch_size / ppo_mini_batch_size."""
    batch = int(_setting(verl, "data.train_batch_size"))
    mini = int(_setting(verl, "actor_rollout_ref.actor.ppo_mini_batch_size"))
    epochs = int(_setting(verl, "actor_rollout_ref.actor.ppo_epochs"))
    if mini <= 0 or batch % mini:
        raise ConfigError(
            f"data.train_batch_size ({batch}) must be a multiple of "
            f"actor_rollout_ref.actor.ppo_mini_batch_size ({mini})"
        )
    return epochs * batch // mini


def _setting(verl: Mapping[str, Any], dotted: str) -> Any:
    """The experiment's value of ``dotted``, else verl's default."""
    value = _get(verl, dotted, _ABSENT)
    return _get(verl_defaults(), dotted) if value is _ABSENT else value


def verl_overrides(experiment: Experiment) -> list[str]:
    """The experiment as ``key=value`` overrides of ``verl.trainer.main_ppo``.

    Leaves verl already has become ``key=value``; new keys under a map that is empty in verl's
    defaults (``data.apply_chat_template_kwargs``, ``engine_kwargs.vllm``, ...) become ``+key=value``,
    and so does every leaf under a key the file writes with a leading ``+`` (``+mixed_precision:``, a
    section verl's schema lacks but its code reads); any other new key stays ``key=value`` so that
    Hydra rejects it as unknown. Then the ``ctpo.loss``
    fields and the per-position diagnostics settings (``+...policy_loss.ctpo_*``), Hydra's own output
    directory (inside the run directory), then the ``+``/``~`` command-line overrides verbatim.
    """
    overrides = list(_tree_overrides(experiment.verl, verl_defaults(), ""))
    extra = {
        **experiment.ctpo.loss,
        "ctpo_diagnostics_dir": experiment.ctpo.run_dir,
        "ctpo_minibatches_per_step": minibatches_per_step(experiment.verl),
        "ctpo_start_step": experiment.ctpo.resume_step,
    }
    overrides += [f"+{LOSS_PREFIX}{key}={hydra_value(value)}" for key, value in extra.items()]
    overrides.append(f"hydra.run.dir={hydra_value(experiment.ctpo.run_dir + '/hydra')}")
    return overrides + list(experiment.passthrough)


def _tree_overrides(node: Mapping[str, Any], defaults: Any, prefix: str) -> Iterator[str]:
    for key, value in node.items():
        if key.startswith("+"):  # a key verl's schema lacks, added on purpose (Hydra's own syntax)
            yield from (f"+{leaf}" for leaf in _tree_overrides({key[1:]: value}, None, prefix))
            continue
        path = f"{prefix}{key}"
        known = isinstance(defaults, dict) and key in defaults
        default = defaults[key] if known else None
        free_form = defaults == {}
        if isinstance(value, dict) and value and (isinstance(default, dict) or not (known or free_form)):
            # into one of verl's sections, or through an unknown key so that Hydra names its leaves
            yield from _tree_overrides(value, default, path + ".")
        elif not known and free_form:
            yield f"+{path}={hydra_value(value)}"
        else:
            yield f"{path}={hydra_value(value)}"


_BARE = re.compile(r"[A-Za-z0-9_./:@~+-]+")
_RESERVED = {"true", "false", "null", "none", "nan", "inf", "-inf", "+inf"}


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: bare where unambiguous, quoted strings otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _RESERVED and not _is_number(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Composing and validating verl's config


def build_job(experiment: Experiment) -> VerlJob:
    """Overrides, verl's composed config, validated by verl and by checks of our extensions."""
    overrides = verl_overrides(experiment)
    config = _compose_checked(overrides, experiment.sources)
    validate_verl_config(config)
    hparams = loss_hparams(experiment.ctpo.method, config)
    return VerlJob(experiment, overrides, config, hparams)


_UNKNOWN_KEY = re.compile(
    r"Could not (?:override|append to|delete from) '([^']+)'|Key '([^']+)' is not in struct"
)


def _compose_checked(overrides: Sequence[str], sources: Mapping[str, str]) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return compose_verl(overrides)
    except HydraException as error:
        match = _UNKNOWN_KEY.search(str(error))
        if match:
            key = (match.group(1) or match.group(2)).lstrip("+~")
            where = sources.get(key, "command line")
            raise ConfigError(
                f"unknown verl key {key!r} (from {where}); verl's keys are in {verl_config_dir() / 'ppo_trainer.yaml'}"
            ) from None
        raise ConfigError(f"verl rejected the overrides: {_one_line(error)}") from None


def validate_verl_config(config: DictConfig) -> None:
    """verl's own ``validate_config`` plus what it leaves to the workers: loss mode, rollout config,
    tool parser, agent loop and tool classes. Imports verl (and our plugin, which registers the losses)."""
    with _quiet():
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config

        import ctpo_cli.train.verl.plugin  # noqa: F401  (registers ctpo/* losses, as in every verl process)

        try:
            validate_config(
                config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
            )
            omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
        except (AssertionError, ValueError, TypeError, OmegaConfBaseException) as error:
            raise ConfigError(f"verl rejected the config: {_one_line(error)}") from None
    loss_mode = config.actor_rollout_ref.actor.policy_loss.loss_mode
    if loss_mode not in POLICY_LOSS_REGISTRY:
        raise ConfigError(
            f"verl has no policy loss {loss_mode!r}; registered: {', '.join(POLICY_LOSS_REGISTRY)}"
        )
    _check_multi_turn(config)


def _check_multi_turn(config: DictConfig) -> None:
    """The tool parser, agent loop and tool classes the rollout will look up exist."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.experimental.agent_loop.tool_parser import ToolParser

    import ctpo_cli.train.verl.tools  # noqa: F401  (registers the ctpo_python_block tool parser)

    rollout = config.actor_rollout_ref.rollout
    if not rollout.multi_turn.enable:
        return
    if rollout.multi_turn.format not in ToolParser._registry:
        raise ConfigError(
            f"unknown tool parser {rollout.multi_turn.format!r} (multi_turn.format); "
            f"registered: {', '.join(ToolParser._registry)}"
        )
    loops = set(_agent_loop_registry)
    if rollout.agent.agent_loop_config_path:
        loops |= {str(entry.name) for entry in _load_yaml_list(rollout.agent.agent_loop_config_path)}
    if rollout.agent.default_agent_loop not in loops:
        raise ConfigError(
            f"unknown agent loop {rollout.agent.default_agent_loop!r}; known: {', '.join(sorted(loops))}"
        )
    if rollout.multi_turn.tool_config_path:
        tool_config = OmegaConf.load(_existing(rollout.multi_turn.tool_config_path))
        for tool in tool_config.get("tools", []) if isinstance(tool_config, DictConfig) else []:
            _import_class(str(tool.class_name))


def _load_yaml_list(path: str) -> list[Any]:
    loaded = OmegaConf.load(_existing(path))
    return list(loaded) if not isinstance(loaded, DictConfig) else []


def _existing(path: str) -> Path:
    if not Path(path).is_file():
        raise InputFileError(f"{path} not found")
    return Path(path)


def _import_class(qualified: str) -> type:
    import importlib

    module, _, name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import tool class {qualified!r}: {_one_line(error)}") from None
    assert isinstance(cls, type)
    return cls


def loss_hparams(method: str, config: DictConfig) -> dict[str, float]:
    """The loss hyperparameters the workers will use (verl's actor config; ValueError when out of range)."""
    actor = config.actor_rollout_ref.actor
    values = {
        key: actor.get(key) for key in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c")
    }
    values.update(OmegaConf.to_container(actor.policy_loss, resolve=True))  # type: ignore[arg-type]
    return method_hparams(method, values)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence verl's import-time and validation chatter (prints and warnings)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _one_line(error: BaseException) -> str:
    """The first meaningful line of an error message, whitespace collapsed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(lines) > 1 and lines[0].endswith(":"):
        text = f"{lines[0]} {lines[1]}"
    return " ".join(text.split())
