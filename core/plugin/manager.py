"""Finding, loading and selecting plugins.

Plugins come from the ``lft`` entry-point group (lft's own methods are declared there too, as a
third party would declare them) and from plugin objects handed to ``lft.run(..., plugins=[...])``.
A run selects some of them; only the selected ones, plus lft's own ``core`` plugin, take part.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from lft.errors import PluginError
from lft.plugin import hookspecs

ENTRY_POINT_GROUP = "lft"
#: Comma-separated plugin names; when set, only these entry points are loaded.
ONLY_ENV = "LFT_PLUGINS"
#: Set to 1 to load no third-party entry points at all (lft's own still load).
DISABLE_ENV = "LFT_DISABLE_PLUGIN_AUTOLOAD"

KINDS = ("objective", "wrapper", "extension")
DEFAULT_OBJECTIVE = "sft"
DEFAULT_WRAPPER = "lora"

hookimpl = pluggy.HookimplMarker("lft")


@dataclass
class PluginInfo:
    """What lft knows about one plugin: where it came from and what it implements."""

    name: str
    kind: str
    obj: Any = None
    package: str = ""
    version: str = ""
    source: str = "entry point"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return self.error is not None


def plugin_kind(obj: Any) -> str:
    kind = getattr(obj, "kind", "extension")
    if kind not in KINDS:
        raise PluginError(f"plugin {plugin_name(obj)!r} declares kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def plugin_name(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(obj, "__name__", type(obj).__name__).lower()


def _instantiate(obj: Any) -> Any:
    # An entry point may name a class (so it can be subclassed), an instance or a module.
    return obj() if isinstance(obj, type) else obj


def suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class PluginManager:
    """Loads every installed plugin and answers questions about them."""

    def __init__(self, extra: Iterable[Any] = (), load_entry_points: bool = True):
        from lft.plugin.core import CorePlugin

        self.pm = pluggy.PluginManager("lft")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.core = CorePlugin()
        self._register(self.core, PluginInfo("core", "core", package="lft", version=_lft_version(), source="core"))
        if load_entry_points:
            self._load_entry_points()
        for obj in extra:
            self.add(obj)
        self._check_pending()

    def _check_pending(self) -> None:
        """A hookimpl whose name matches no hook (a typo) is an error naming plugin and hook."""
        known = [name for name in dir(hookspecs) if name.startswith("lft_")]
        for name, obj in self.pm.list_name_plugin():
            for attr in dir(obj):
                if attr.startswith("lft_") and attr not in known and self.pm.parse_hookimpl_opts(obj, attr) is not None:
                    info = self.infos.get(name)
                    package = f" from {info.package}" if info and info.package else ""
                    raise PluginError(
                        f"plugin {name!r}{package} implements unknown hook {attr!r}"
                        f"{suggest(attr, known)}; hooks: {', '.join(sorted(known))}"
                    )
        self.pm.check_pending()

    # -- loading -------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        only = {n.strip() for n in os.environ.get(ONLY_ENV, "").split(",") if n.strip()}
        no_third_party = os.environ.get(DISABLE_ENV, "") not in ("", "0")
        seen: dict[str, str] = {}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            package = dist.name if dist is not None else "?"
            version = dist.version if dist is not None else ""
            if only and ep.name not in only:
                continue
            if no_third_party and package != "lft":
                continue
            if ep.name in seen:
                if seen[ep.name] == package:
                    continue  # the same distribution seen twice on sys.path
                raise PluginError(
                    f"two installed packages provide the plugin {ep.name!r}: {seen[ep.name]} and {package}; "
                    f"uninstall one of them"
                )
            seen[ep.name] = package
            info = PluginInfo(ep.name, "extension", package=package, version=version)
            try:
                obj = _instantiate(ep.load())
                info.kind = plugin_kind(obj)
            except Exception as exc:  # a broken third-party plugin must not take lft down
                info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.infos[ep.name] = info
                warnings.warn(
                    f"lft plugin {ep.name!r} from {package} failed to load and is skipped: {info.error}", stacklevel=2
                )
                continue
            self._register(obj, info)

    def _register(self, obj: Any, info: PluginInfo) -> None:
        info.obj = obj
        try:
            self.pm.register(obj, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {info.name!r} from {info.package or 'python'}: {_signature_problem(obj, exc)}"
            ) from None
        except ValueError as exc:
            raise PluginError(f"plugin {info.name!r} could not be registered: {exc}") from None
        info.hooks = sorted(c.name for c in self.pm.get_hookcallers(obj) or [])
        self.infos[info.name] = info

    def add(self, obj: Any) -> str:
        """Register a plugin object given from Python; it replaces an installed plugin of the same name."""
        obj = _instantiate(obj)
        name = plugin_name(obj)
        if name == "core":
            raise PluginError("the plugin name 'core' is reserved for lft itself")
        old = self.infos.get(name)
        if old is not None and old.obj is not None:
            self.pm.unregister(old.obj)
        module = type(obj).__module__ if not hasattr(obj, "__path__") else getattr(obj, "__name__", "")
        info = PluginInfo(name, plugin_kind(obj), package=module.split(".")[0], source="python")
        self._register(obj, info)
        return name

    # -- questions -----------------------------------------------------------------------------
    def available(self, kind: str | None = None) -> list[str]:
        return sorted(
            n for n, i in self.infos.items() if not i.broken and i.kind != "core" and (kind is None or i.kind == kind)
        )

    def select(self, names: Iterable[str]) -> "Selection":
        """Check a selection of plugin names and fill in the default objective and wrapper."""
        wanted: list[str] = []
        for name in names:
            if name not in wanted:
                wanted.append(name)
        available = self.available()
        for name in wanted:
            info = self.infos.get(name)
            if info is None or info.kind == "core":
                raise PluginError(
                    f"unknown plugin {name!r}{suggest(name, available)}; available: {', '.join(available)}"
                )
            if info.broken:
                raise PluginError(f"plugin {name!r} from {info.package} is installed but failed to load: {info.error}")
        defaults: list[str] = []
        for kind, default in (("objective", DEFAULT_OBJECTIVE), ("wrapper", DEFAULT_WRAPPER)):
            chosen = [n for n in wanted if self.infos[n].kind == kind]
            label = "objectives" if kind == "objective" else "model wrappers"
            if len(chosen) > 1:
                raise PluginError(
                    f"choose one {kind}, not {len(chosen)}: {' and '.join(chosen)} were selected; "
                    f"{label}: {', '.join(self.available(kind))}"
                )
            if not chosen:
                if default not in self.infos or self.infos[default].broken:
                    raise PluginError(
                        f"no {kind} selected and the default {default!r} is not installed; "
                        f"{label}: {', '.join(self.available(kind)) or 'none'}"
                    )
                wanted.append(default)
                defaults.append(f"{kind} {default}")
        return Selection(self, wanted, defaults)


class Selection:
    """The plugins of one run, with a hook relay that calls only them (and the core plugin)."""

    def __init__(self, manager: PluginManager, names: list[str], defaults: list[str]):
        self.manager = manager
        self.names = names
        self.defaults = defaults
        infos = manager.infos
        self.objective = next(n for n in names if infos[n].kind == "objective")
        self.wrapper = next(n for n in names if infos[n].kind == "wrapper")
        self.extensions = [n for n in names if infos[n].kind == "extension"]
        excluded = [i.obj for n, i in infos.items() if n not in names and i.obj is not None and n != "core"]
        self.hook = _SubsetRelay(manager.pm, excluded)

    def plugin(self, name: str) -> Any:
        return self.manager.infos[name].obj

    def describe(self) -> str:
        parts = [f"objective {self.objective}", f"wrapper {self.wrapper}"]
        if self.extensions:
            parts.append("extensions " + ", ".join(self.extensions))
        return "; ".join(parts)


class _SubsetRelay:
    """``relay.lft_x(...)`` calls hook ``lft_x`` on the selected plugins only."""

    def __init__(self, pm: pluggy.PluginManager, excluded: list[Any]):
        self._pm = pm
        self._excluded = excluded
        self._callers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        caller = self._callers.get(name)
        if caller is None:
            if not hasattr(self._pm.hook, name):
                raise AttributeError(f"no hook named {name!r}")
            caller = self._pm.subset_hook_caller(name, self._excluded)
            self._callers[name] = caller
        return caller


def _signature_problem(obj: Any, exc: Exception) -> str:
    """One line saying which hook of a plugin does not fit lft's hookspec, and how."""
    import inspect

    for name in dir(obj):
        spec = getattr(hookspecs, name, None)
        if not name.startswith("lft_") or spec is None:
            continue
        impl = [p for p in inspect.signature(getattr(obj, name)).parameters if p != "self"]
        allowed = list(inspect.signature(spec).parameters)
        unknown = [p for p in impl if p not in allowed]
        if unknown:
            return (
                f"hook {name}({', '.join(impl)}) does not match lft's {name}({', '.join(allowed)}): "
                f"unknown argument(s) {', '.join(unknown)}; the plugin was written for another lft version"
            )
    return " ".join(str(exc).split())


def _lft_version() -> str:
    try:
        return metadata.version("lft")
    except metadata.PackageNotFoundError:
        return "0+unknown"
