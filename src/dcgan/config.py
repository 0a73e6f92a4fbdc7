"""The configuration, assembled: each module owns the dataclass of its settings; this one puts them together.

The YAML files in `configs/` fill these schemas, so a misspelt key or a wrong type fails when the
config is composed; `validate_train` then runs each module's checks of what a type cannot express
(a batch size of 0, an image size the architecture cannot make). Every problem is raised as
errors.UserError, which the command line (cli.py) turns into one line on stderr and exit code 2.

Schemas: train_schema and report_schema here; gan-sample's and gan-eval's register themselves
(sample.py, evaluate.py) through `register_schema`, as those modules build on this one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, List

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dcgan import augment, data, guard, log, losses, metrics, models, optim, train
from dcgan.augment import AugmentConfig
from dcgan.data import DatasetConfig
from dcgan.errors import UserError, one_of, unused
from dcgan.losses import LossConfig
from dcgan.metrics import TrainEvalConfig
from dcgan.models import DiscriminatorConfig, GeneratorConfig
from dcgan.optim import OptimizerConfig
from dcgan.report import ReportConfig
from dcgan.train import TrainerConfig


def config_dir() -> Path:
    """The `configs/` tree: inside the installed package, or at the top of a source checkout.

    Hydra resolves a relative `config_path` through the Python package when it runs as a console
    script, which misses a top-level folder (hydra issue #2125), so we hand it an absolute path.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    raise UserError(f"the configs/ folder is missing (looked in {packaged} and {checkout}); reinstall the package")


@dataclass
class SweepConfig:
    """What each job of a sweep (`gan-train -m`) returns to the sweeper; how and when: sweep.py."""

    objective: str = "fid"  # fid | kid (the last checkpoint, gan-eval's protocol) | loss_g | loss_d | none


OBJECTIVES = ("fid", "kid", "loss_g", "loss_d", "none")


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # FID/KID during training (trainer.eval_every*): fewer images than gan-eval's 10,000, for speed.
    eval: TrainEvalConfig = field(default_factory=lambda: TrainEvalConfig(n=2000))
    # Where metrics go: jsonl (metrics.jsonl, always) plus optional trackers, e.g. logger=[jsonl,tensorboard].
    logger: List[str] = field(default_factory=lambda: ["jsonl"])
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Class-conditional training: G draws the class it is asked for, D judges each image by its class. The
    # labels come from the data set (data.load_labels); generator.condition and discriminator.condition say how
    # the networks read them.
    conditional: bool = False


def register_schema(name: str, node: Any) -> None:
    """Make a dataclass the schema a config file names in its defaults list (e.g. `- train_schema`)."""
    ConfigStore.instance().store(name=name, node=node)


register_schema("train_schema", TrainConfig)
register_schema("report_schema", ReportConfig)


def compose(config_name: str, overrides: List[str]) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with command-line style overrides, as Hydra would.

    The user's own config folders (`--config-dir DIR`, `hydra.searchpath=[file://DIR]`) are searched after the
    package's, so their files add options to a group (a data set, a network, a preset) next to the shipped ones.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Keep only config overrides and the search path; Hydra's other settings (hydra.run.dir=...) don't change it.
    given = with_config_dir(overrides)
    config_overrides = [o for o in given if is_search_path(o) or not o.lstrip("+~").startswith(("hydra.", "-"))]
    if config_name != "train" and len(config_overrides) < len(given):  # gan-train's are Hydra's, read by Hydra
        raise UserError(not_a_setting(next(o for o in given if o not in config_overrides), config_name))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = hydra_compose(config_name=config_name, overrides=config_overrides)
        check_known_keys(composed, config_name)  # `+key=...` adds a key the schema lacks, which nothing would read
        OmegaConf.to_container(composed, resolve=True)  # an interpolation that can't resolve fails here, as one line
        return composed
    except UserError:
        raise
    except Exception as error:  # Hydra and OmegaConf report bad overrides with their own exception types
        raise UserError(describe_config_error(error, config_name)) from None
    finally:
        GlobalHydra.instance().clear()


def not_a_setting(arg: str, config_name: str) -> str:
    """gan-sample, gan-eval and gan-report have no run folder, no sweep and one config: Hydra's options do nothing."""
    return (
        f"{arg} would have no effect: gan-{config_name} takes KEY=VALUE settings only (`gan-{config_name} --help` "
        "lists them, and --config-dir adds config folders); Hydra's options (-m, -cn, hydra.*) are gan-train's"
    )


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def is_search_path(override: str) -> bool:
    return override.startswith("hydra.searchpath=")


def with_config_dir(args: List[str]) -> List[str]:
    """`--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`) as the override that adds the same folder to the
    search path, `hydra.searchpath=[file:///abs/DIR]`, so a composition outside Hydra's own command line (the
    checks before gan-train starts, gan-sample, gan-eval) finds what Hydra will; the arguments left are
    overrides only. Several folders, or folders given both ways, are searched in order."""
    folders: List[str] = []
    rest: List[str] = []
    args = iter(args)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            folder = Path(value if equals else next(args, "")).expanduser().resolve()
            if not folder.is_dir():
                raise UserError(f"{flag} {folder}: no such folder; give a folder that holds your config groups")
            folders.append(f"file://{folder}")
        else:
            rest.append(arg)
    if not folders:
        return rest
    given = [a for a in rest if is_search_path(a)]
    if given:  # hydra.searchpath=[a,b] given as well: one list, the --config-dir folders first
        inner = given[0].split("=", 1)[1].strip().strip("[]")
        folders += [inner] if inner else []
    rest = [a for a in rest if not is_search_path(a)]
    # Beside the other overrides: Hydra's parser takes them as one run of words (`... --cfg job` after them).
    first = next((i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")), len(rest))
    return [*rest[:first], f"hydra.searchpath=[{','.join(folders)}]", *rest[first:]]


def describe_config_error(error: Exception, config_name: str = "train") -> str:
    """One readable sentence from a Hydra/OmegaConf composition error of `config_name`, with what to do about it."""
    messages = []
    while error is not None:
        text = " ".join(str(error).split())
        messages.append(text.split(" Config search path")[0].split(" full_key:")[0])
        error = error.__cause__ or error.__context__
    # Outer first; OmegaConf repeats itself with "$VALUE" templates further down the chain.
    message = ": ".join(list(dict.fromkeys(m for m in messages if m and "$VALUE" not in m))[:2])
    shown = where_keys_are(config_name)
    missing_folder = re.search(r"Additional config directory '([^']+)' not found", message)
    if missing_folder:  # --config-dir or hydra.searchpath
        return f"--config-dir {missing_folder[1]}: no such folder; give a folder that holds your config groups"
    if "Could not override" in message or "not in" in message:
        # "Could not override 'trainer.x'" (the command line), or "In 'generator/mine': ... Key 'x' not in" (a file)
        key = message.split("'")[1] if "'" in message else "?"
        in_file = re.match(r"In '([^']+)': .*Key '([^']+)' not in", message)
        if in_file:
            return f"unknown config key {in_file.group(2)} in {in_file.group(1)}.yaml: check its spelling; {shown}"
        return unknown_key_message(key, config_name)
    if "Could not find" in message:
        return missing_option_message(message)
    return f"bad configuration: {message}"


def missing_option_message(message: str) -> str:
    """Hydra's "Could not find 'dataset/mnsit' Available options in 'dataset': celeba ..." as one sentence, with
    the nearest option (a typo is the usual cause) and where a file of the user's own would go."""
    own = "or add your own file in a folder of your own and pass --config-dir FOLDER (docs/extending.md)"
    found = re.search(r"Could not find '(.+)/([^'/]+)'\s*Available options in '[^']+':\s*(.*)", message)
    if not found:
        return f"{re.sub(r'In .[a-z_]+.: ', '', message)}; {own}"
    group, name, options = found[1], found[2], found[3].split()
    nearest = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f"did you mean {group}={nearest[0]}? " if nearest else ""
    return f"{group}={name}: no such option; {hint}{group} is one of {', '.join(options)}, {own}"


def check_known_keys(task: DictConfig, config_name: str = "train") -> None:
    """A key the schema lacks (added with `+`, which Hydra allows) would be ignored: refuse it, naming the nearest."""
    schema = ConfigStore.instance().load(f"{config_name}_schema.yaml").node
    unknown = next(unknown_keys(task, schema, ""), None)
    if unknown is not None:
        raise UserError(unknown_key_message(unknown, config_name))


def unknown_keys(given: DictConfig, schema: DictConfig, prefix: str) -> Iterator[str]:
    """Dotted keys of `given` that the dataclass schema has no field for (a Dict[str, Any] field takes any key)."""
    structured = dataclasses.is_dataclass(OmegaConf.get_type(schema))
    for key in given.keys():
        if key not in schema:
            if structured:
                yield f"{prefix}{key}"
            continue
        inner, inner_schema = given._get_node(key), section_schema(schema._get_node(key))
        if isinstance(inner, DictConfig) and isinstance(inner_schema, DictConfig) and not inner_schema._is_none():
            yield from unknown_keys(inner, inner_schema, f"{prefix}{key}.")


def section_schema(node: Any) -> Any:
    """A section's schema; for an optional section that is None by default (gan-eval's dataset), its dataclass's."""
    if isinstance(node, DictConfig) and node._is_none() and dataclasses.is_dataclass(node._metadata.ref_type):
        return OmegaConf.structured(node._metadata.ref_type)
    return node


def unknown_key_message(key: str, config_name: str = "train") -> str:
    """'unknown config key K: did you mean K2?': the nearest key of the command's schema, and where keys are listed."""
    nearest = difflib.get_close_matches(key, known_keys(config_name), n=1, cutoff=0.6)
    hint = f"did you mean {nearest[0]}? " if nearest else "check its spelling; "
    return f"unknown config key {key}: {hint}{where_keys_are(config_name)}"


def where_keys_are(config_name: str) -> str:
    """What a user of the installed command has: its --help, and Hydra's --cfg job (gan-train only)."""
    command = f"gan-{config_name}"
    return f"`{command} --help` lists every key with its default" + (
        "; add `--cfg job` to your command to print the config it composes" if command == "gan-train" else ""
    )


def known_keys(config_name: str) -> List[str]:
    """Every key of a command's schema, dotted (trainer.max_steps, optimizer.generator.lr, ...)."""

    def walk(node: Any, prefix: str) -> Iterable[str]:
        for key in node.keys():
            yield prefix + str(key)
            value = section_schema(node._get_node(key))
            if isinstance(value, DictConfig) and not value._is_missing() and not value._is_none():
                yield from walk(value, f"{prefix}{key}.")

    stored = ConfigStore.instance().load(f"{config_name}_schema.yaml").node
    return list(walk(stored, ""))


def validate_train(cfg: TrainConfig | DictConfig) -> None:
    """Each module's checks of its section, in the order a reader meets them; raises UserError naming key and fix."""
    if isinstance(cfg, DictConfig):
        check_known_keys(cfg)
    data.validate_dataset(cfg.dataset)
    models.validate_networks(cfg)
    losses.validate_loss(cfg.loss)
    augment.parse_policy(cfg.augment.policy)
    optim.validate_optimizers(cfg.optimizer)
    train.validate_trainer(cfg.trainer)
    guard.validate_health(cfg.trainer.health, cfg.trainer.on_divergence)
    if cfg.trainer.cuda_graphs and cfg.loss.r1_weight > 0 and cfg.loss.r1_every > 1:  # one captured step: R1 or not
        raise UserError(
            "lazy R1 (loss.r1_every > 1) varies the step, which a CUDA graph can't follow: "
            "set trainer.cuda_graphs=false or loss.r1_every=1"
        )
    if cfg.trainer.eval_every or cfg.trainer.eval_every_minutes:
        metrics.validate_metrics("eval.", cfg.eval)
        metrics.validate_eval_split(cfg.eval, cfg.dataset)
        metrics.require_inception_weights(cfg.eval)
    log.validate_loggers(cfg.logger)
    one_of("sweep.objective", cfg.sweep.objective, OBJECTIVES)
    validate_conditioning(cfg)
    # Building the networks on the meta device costs no memory and proves the architecture can
    # make images of this size and channel count, and that they fit in memory.
    models.check_shapes(cfg)
    models.check_memory(cfg)


def validate_conditioning(cfg: TrainConfig | DictConfig) -> None:
    """How the networks read the class, and only where there is one (conditional=true)."""
    one_of("generator.condition", cfg.generator.condition, models.GENERATOR_CONDITIONS)
    one_of("discriminator.condition", cfg.discriminator.condition, models.DISCRIMINATOR_CONDITIONS)
    if cfg.conditional:
        if cfg.trainer.grid_size != train.TrainerConfig().grid_size:
            unused(
                "trainer.grid_size",
                cfg.trainer.grid_size,
                f"a conditional run's grids are one row of {train.GRID_COLUMNS} per class",
                "remove it",
            )
        return
    settings = [
        ("generator.condition", cfg.generator.condition, models.GeneratorConfig().condition),
        ("discriminator.condition", cfg.discriminator.condition, models.DiscriminatorConfig().condition),
        ("dataset.attributes", list(cfg.dataset.attributes), []),
    ]
    for key, value, default in settings:
        if value != default:
            unused(key, value, "the run is not conditional", "add conditional=true, or remove it")


def train_config_from_yaml(text: str) -> DictConfig:
    """The training config stored in a checkpoint, checked against today's schema."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
    from yaml import YAMLError

    schema = OmegaConf.structured(TrainConfig)
    try:
        return OmegaConf.merge(schema, OmegaConf.create(text))
    except ConfigKeyError as error:
        # Settings are only ever added, so a key we lack means a newer dcgan wrote the checkpoint.
        raise UserError(
            f"the checkpoint's config has {error.full_key}, a setting this version of dcgan does not know: "
            "the checkpoint was written by a newer version; upgrade dcgan (pip install -U dcgan) to read it"
        ) from None
    except (OmegaConfBaseException, YAMLError) as error:
        reason = " ".join(str(error).split()).split(" full_key:")[0][:200]
        raise UserError(
            f"the checkpoint's stored config does not fit this version of dcgan ({reason}); the checkpoint "
            "is damaged or from another version"
        ) from None
