"""Hydra glue: where conf/ and recipes/ live, and how a recipe becomes a checked `Recipe`.

Recipes are the Hydra config group `recipe`, but they live in a top-level `recipes/` folder (and
in a user's own `./recipes`). Hydra names groups after folders, so a tiny ConfigSource (scheme
`recipes://`) presents any folder of recipe files as the `recipe` group, and a SearchPathPlugin
adds the shipped folder and `./recipes` to every composition: `hydra.main` runs and sweeps as well
as the compose API used by `plan` and `validate`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from d2build.recipe import MOVED, Problem, Recipe, RecipeError
from d2build.schema import parse_recipe

RECIPE_GROUP = "recipe"
_PACKAGE_ROOT = Path(__file__).resolve().parent


def _resource_dir(package: str, checkout_name: str) -> Path:
    """A data folder shipped in the wheel (package-dir mapping) or, from a checkout, beside d2build/."""
    checkout = _PACKAGE_ROOT.parent / checkout_name
    if checkout.is_dir() and (checkout / "__init__.py").exists():
        return checkout
    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        return checkout


def conf_dir() -> Path:
    return _resource_dir("d2build.conf", "conf")


def shipped_recipes_dir() -> Path:
    return _resource_dir("d2build.recipes", "recipes")


def conf_default(key: str) -> Any:
    """A default as conf/config.yaml writes it ("" for the whole tree): the one place defaults are written."""
    node: Any = _conf_tree(str(conf_dir() / "config.yaml"))
    for part in key.split(".") if key else ():
        node = node[part]
    return node


@functools.lru_cache(maxsize=None)
def _conf_tree(path: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


#: folders searched for recipes before ./recipes and the shipped ones (os.pathsep-separated); set by the user,
#: or for one composition by `extra_recipe_dirs` (`d2build validate path/to/file.yaml`); Hydra's job processes
#: inherit it like every environment variable
RECIPE_DIRS_ENV = "D2BUILD_RECIPE_DIRS"


@contextlib.contextmanager
def extra_recipe_dirs(dirs: list[Path]) -> Iterator[None]:
    """Search these folders first while the block runs."""
    before = os.environ.get(RECIPE_DIRS_ENV)
    os.environ[RECIPE_DIRS_ENV] = os.pathsep.join([*(str(Path(d).resolve()) for d in dirs), *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RECIPE_DIRS_ENV, None)
        else:
            os.environ[RECIPE_DIRS_ENV] = before


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes: $D2BUILD_RECIPE_DIRS, the user's ./recipes (it wins a name clash with the
    shipped ones), then the shipped ones."""
    dirs = [Path(d).resolve() for d in os.environ.get(RECIPE_DIRS_ENV, "").split(os.pathsep) if d]
    local = Path.cwd() / "recipes"
    if local.is_dir() and local.resolve() not in dirs:
        dirs.append(local.resolve())
    shipped = shipped_recipes_dir().resolve()
    if shipped not in dirs:
        dirs.append(shipped)
    return dirs


def list_recipes() -> dict[str, Path]:
    """Recipe name -> file, first folder wins."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


class RecipeFolderSource(ConfigSource):
    """Presents a plain folder of recipe YAML files as the Hydra config group `recipe`."""

    @staticmethod
    def scheme() -> str:
        return "recipes"

    def _file(self, config_path: str) -> Optional[Path]:
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != RECIPE_GROUP or len(parts) != 2:
            return None
        return Path(self.path) / self._normalize_file_name(parts[1])

    def load_config(self, config_path: str) -> ConfigResult:
        f = self._file(config_path)
        if f is None or not f.is_file():
            raise ConfigLoadError(f"Recipe not found: {config_path}")
        text = f.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(OmegaConf.load(f)),
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", RECIPE_GROUP) and self.available()

    def is_config(self, config_path: str) -> bool:
        f = self._file(config_path)
        return f is not None and f.is_file()

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        if path == "":
            return [RECIPE_GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if path != RECIPE_GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(f.stem for f in Path(self.path).glob("*.yaml"))


class RecipeSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for d in recipe_dirs():
            search_path.append(provider="d2build-recipes", path=f"recipes://{d}")


def register_plugins() -> None:
    plugins = Plugins.instance()
    plugins.register(RecipeFolderSource)
    plugins.register(RecipeSearchPath)


def _override_map(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o:
            k, v = o.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


#: recipe keys naming files or folders: a relative path is taken from the working directory, or else from
#: the recipe file's folder (so a recipe can sit beside its model files, or ship with paths into the checkout)
PATH_KEYS = (("model", "config"), ("model", "weights"), ("verify", "images"), ("calibration", "images"),
             ("eval", "annotations"), ("eval", "images"))


def recipe_from_tree(tree: dict[str, Any], recipe_name: str, overrides: list[str]) -> Recipe:
    source = list_recipes().get(recipe_name)
    src = os.path.relpath(source) if source and not os.path.relpath(source).startswith("..") else str(source)
    given = _override_map(overrides)
    if source is not None:
        for section, key in PATH_KEYS:
            value = (tree.get(section) or {}).get(key)
            if (isinstance(value, str) and f"{section}.{key}" not in given and not Path(value).is_absolute()
                    and not Path(value).expanduser().exists() and (Path(source).parent / value).exists()):
                tree[section][key] = str((Path(source).parent / value).resolve())
    return parse_recipe(tree, conf_default, name=recipe_name, source=src, overrides=given)


def recipe_from_hydra(cfg: DictConfig) -> Recipe:
    """Inside a hydra.main job: the checked Recipe for this job's config and overrides."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    tree = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(tree, dict)
    return recipe_from_tree(tree, hc.runtime.choices.get(RECIPE_GROUP, "?"), list(hc.overrides.task))


def compose(overrides: list[str]) -> Recipe:
    """The one composition every command but a run uses (a run's Hydra app composes the same tree):
    Hydra's compose API with the recipe search path, `${hydra:...}` resolvable as in a run, then the
    schema. Any problem -- Hydra's (an unknown group option, a bad defaults list), an interpolation
    that does not resolve, the schema's -- is raised as a RecipeError naming the file and key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_plugins()
    picked = _override_map(overrides).get(RECIPE_GROUP)
    source = str(list_recipes().get(picked, "command line")) if picked else "command line"
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # so ${hydra:...} resolves as in a run
            choice = cfg.hydra.runtime.choices.get(RECIPE_GROUP, "?")
            source = str(list_recipes().get(choice, source))
            tree: dict[str, Any] = {}
            for k in cfg:
                if k == "hydra":
                    continue
                try:
                    node = cfg[k]
                    tree[str(k)] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
                except OmegaConfBaseException as e:
                    key = getattr(e, "full_key", None) or str(k)
                    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
                    raise RecipeError([Problem(_display(source), key, f"cannot be resolved ({msg})",
                                               "point the interpolation ${...} at a key that exists, or write "
                                               "the value")]) from e
    except HydraException as e:
        raise RecipeError([hydra_problem(_display(source), e, _override_map(overrides))]) from e
    except OmegaConfBaseException as e:
        raise RecipeError([Problem(_display(source), getattr(e, "full_key", None) or "(config)",
                                   str(e).splitlines()[0], "fix the value")]) from e
    return recipe_from_tree(tree, choice, list(overrides))


def _display(path: str) -> str:
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return rel if not rel.startswith("..") else path


def _groups() -> list[str]:
    return sorted([p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
                  + [RECIPE_GROUP])


@functools.lru_cache(maxsize=1)
def _config_keys() -> list[str]:
    """Every key a recipe has, from the recipe's dataclasses (group options' keys included)."""
    import dataclasses
    import typing


    def walk(cls: Any, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.name in ("name", "source"):
                continue
            inner = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            tp = inner[0] if len(inner) == 1 else hints[f.name]
            out += walk(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
        return out

    return walk(Recipe, "")


@functools.lru_cache(maxsize=1)
def _known_names() -> list[str]:
    """Every key, section and group a command-line override can name (for did-you-mean)."""
    keys = _config_keys()
    sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    return sorted({*keys, *sections, *_groups()})


def hydra_problem(src: str, e: Exception, overrides: dict[str, str] | None = None) -> Problem:
    """Hydra's composition error as one Problem: which group or option, and what exists; blamed on the
    command-line override that caused it where there is one."""
    problem = _hydra_problem(src, e)
    if overrides and problem.key in overrides:
        problem = Problem(f"command line ({problem.key}={overrides[problem.key]})", problem.key, problem.message,
                          problem.fix)
    return problem


def _hydra_problem(src: str, e: Exception) -> Problem:
    from hydra.errors import OverrideParseException

    text = str(e)
    if isinstance(e, OverrideParseException):
        return token_problem(e.override, _parse_reason(text))
    m = re.search(r"Ambiguous value for argument '([^']*)'", text)
    if m:
        return sweep_problem(m.group(1))
    m = re.search(r"Could not find '(.+)/([^'/]+)'", text)
    if m:
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path:")[0], flags=re.M)
        return Problem(src, group, f"there is no {group} option {option!r}", _options_fix(option, options, group))
    m = re.search(r"Could not override '([^']+)'", text)
    if m and ("To append to your config" in text or "is not in struct" in str(e.__cause__)):  # an unknown key
        key = m.group(1)
        if key in MOVED:
            return Problem(src, key, f"has moved to {MOVED[key][0]} ({MOVED[key][1]})", f"use {MOVED[key][0]} instead")
        if key in _config_keys():  # a schema key inside an optional section the config leaves null
            parent, _, leaf = key.rpartition(".")
            return Problem(src, key, f"cannot be set on its own: {parent} has no {leaf} yet (it is null, or "
                           "an override's mapping without it)", f"write it inside the mapping "
                           f"({parent}={{...,{leaf}:VALUE}}), or add it with +{key}=VALUE")
        return Problem(src, key, "unknown key", _unknown_key_fix(key))
    if m:
        group = m.group(1)
        near = difflib.get_close_matches(group, _groups(), n=1)
        fix = f"did you mean `override /{near[0]}`?" if near else f"groups: {', '.join(_groups())}"
        return Problem(src, group, "no such group in the defaults list", fix)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return Problem(src, "defaults", f"Hydra cannot compose it ({first})",
                   "check the recipe's defaults list (`- override /GROUP: OPTION`)")


def _options_fix(given: str, options: list[str], group: str) -> str:
    """`did you mean X? use one of: ...` (each valid option once)."""
    if not options:
        return f"check conf/{group}/"
    near = difflib.get_close_matches(given, options, n=1)
    return (f"did you mean {near[0]}? " if near else "") + f"use one of: {', '.join(options)}"


def _unknown_key_fix(key: str) -> str:
    """A close key next to it, the same name elsewhere, a close key or group anywhere; else what exists
    where `key` points."""
    if key.split(".")[0] == "hydra":
        return "Hydra's own settings are listed by `d2build --cfg hydra`"
    names = _known_names()
    parent, _, leaf = key.rpartition(".")
    under = sorted({n[len(parent) + 1:].split(".")[0] for n in names if parent and n.startswith(parent + ".")})
    if under:  # the section exists: a typo of one of its keys, or a key of another section
        near = difflib.get_close_matches(leaf, under, n=1)
        if near:
            return f"did you mean {parent}.{near[0]}?"
        elsewhere = [n for n in names if n.endswith("." + leaf)]
        if elsewhere:
            return f"did you mean {' or '.join(elsewhere[:2])}?"
        return f"keys under {parent}: {', '.join(under)}"
    near = difflib.get_close_matches(key, names, n=1)
    if near:
        return f"did you mean {near[0]}?"
    return f"sections: {', '.join(sorted({k.split('.')[0] for k in _config_keys()}))}; groups: {', '.join(_groups())}"


def _parse_reason(text: str) -> str:
    """The first line of Hydra's override-grammar message, without the grammar's internal names."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("See https://")]
    lines = [ln for ln in lines if not ln.startswith("Error parsing override")] or lines
    first = lines[0].strip() if lines else "cannot be parsed"
    if first.startswith("LexerNoViableAltException"):
        return "a character Hydra's override grammar does not allow there"
    return first


def token_problem(token: str, reason: str | None = None, commands: list[str] | tuple[str, ...] = ()) -> Problem:
    """A command-line word Hydra cannot read as an override: a word without `=` (a typo of a sub-command,
    `key value` for `key=value`, a flag the command does not take), or a value its grammar rejects.
    `commands`: sub-command names, where the word could have been one (the first word of `d2build ...`)."""
    if token.startswith("-"):
        return Problem("command line", token, "is not an option of this command", "see its --help; "
                       "settings are KEY=VALUE overrides (e.g. surgery.nms.iou_threshold=0.6)")
    name = token.lstrip("+~").split("=", 1)[0].strip()
    if "=" not in token:
        word = name.split()[0] if name.split() else name
        example = "overrides look like recipe=mask_rcnn_r50 or surgery.nms.iou_threshold=0.6"
        if word in _known_names():
            return Problem("command line", token, "is not KEY=VALUE", f"write {word}=VALUE (no spaces around =)")
        near_cmd = difflib.get_close_matches(word, list(commands), n=1)
        near_key = difflib.get_close_matches(word, _known_names(), n=1)
        if commands:
            hint = (f"did you mean `d2build {near_cmd[0]}`? " if near_cmd else
                    f"did you mean {near_key[0]}=...? " if near_key else "")
            return Problem("command line", token, "is neither a sub-command nor a KEY=VALUE override",
                           f"{hint}sub-commands: {', '.join(commands)}; {example} (d2build --help)")
        hint = f"did you mean {near_key[0]}=...? " if near_key else ""
        return Problem("command line", token, "is not a KEY=VALUE override", f"{hint}{example}")
    return Problem(f"command line ({token})", name, f"cannot be parsed ({reason or 'Hydra override grammar'})",
                   "quote a value with spaces or special characters (key='a b'); a list is [a,b], a mapping "
                   "{k: v} (Hydra's override grammar)")


def sweep_problem(token: str) -> Problem:
    """`key=a,b` outside a multirun: Hydra reads it as a sweep."""
    key = token.lstrip("+~").split("=", 1)[0]
    return Problem(f"command line ({token})", key, "has several values (a sweep), but this is not a multirun",
                   "add -m to run one job per value; for one value that is a list write [a,b], for a string "
                   "with commas quote it ('a,b')")


#: a multirun's values composed one by one before its first job (each with every other key's first value)
MAX_CHECKED_JOBS = 64


def check_run(overrides: list[str], multirun: bool = False, commands: tuple[str, ...] = ()) -> None:
    """What a run's Hydra app (`hydra.main`) and the schema would refuse, raised as one RecipeError before
    the app starts: every word parsed by Hydra's override grammar, a sweep without -m, then the
    composition. A multirun is checked per value (each swept value with the other keys' first values,
    up to MAX_CHECKED_JOBS compositions), not per job of the cartesian product; sweeps other than lists
    and ranges (a sweeper's interval()) are left to the sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    problems: list[Problem] = []
    parsed = []
    first_error: Exception | None = None
    skip = False
    for i, token in enumerate(overrides):
        if skip:
            skip = False
            continue
        after = overrides[i + 1] if i + 1 < len(overrides) else None
        if "=" not in token and token in _known_names() and after is not None and "=" not in after:
            problems.append(Problem(f"command line ({token} {after})", token, "is not KEY=VALUE",
                                    f"write {token}={after} (no spaces around =)"))
            skip = True
            continue
        try:
            (o,) = parser.parse_overrides([token])
        except HydraException as e:
            problems.append(token_problem(token, _parse_reason(str(e)), commands if i == 0 else ()))
            first_error = first_error or e
            continue
        parsed.append((token, o))
    if problems:
        raise RecipeError(problems) from first_error
    sweeps = [(t, o) for t, o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise RecipeError([sweep_problem(t) for t, _ in sweeps])
    if not sweeps:
        compose(overrides)
        return
    base: list[str] = []
    variants: list[tuple[int, list[str]]] = []  # (index in base, other values)
    for token, o in parsed:
        if not o.is_sweep_override():
            base.append(token)
        elif o.is_discrete_sweep():
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if values:
                base.append(values[0])
                variants.append((len(base) - 1, values[1:]))
        # interval() and other continuous sweeps: the sweeper's to sample
    jobs = [base] + [base[:i] + [v] + base[i + 1:] for i, vs in variants for v in vs]
    seen: dict[Problem, None] = {}
    cause: Exception | None = None
    for job in jobs[:MAX_CHECKED_JOBS]:
        try:
            compose(job)
        except RecipeError as e:
            seen.update(dict.fromkeys(e.problems))
            cause = cause or e.__cause__
    if seen:
        raise RecipeError(list(seen)) from cause
