"""The plugin manager factory: hook specs, the core plugin, entry points, ``--plugin`` modules."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs, upstream
from .codec import Cipher
from .errors import ConfigError
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, HandlerSpec

__all__ = ["RelayPluginManager", "PluginInfo", "get_plugin_manager", "DISTRIBUTION"]

DISTRIBUTION = "relay-proxy"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "core", "bundled", "entry point", "--plugin"
    version: str
    module: str
    hooks: tuple[str, ...]


class RelayPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.sources: dict[str, str] = {}
        self.versions: dict[str, str] = {}

    def handlers(self) -> dict[str, HandlerSpec]:
        found: dict[str, HandlerSpec] = {}
        for specs in self.hook.relay_register_handlers():
            for spec in specs or ():
                if spec.name in found and found[spec.name] is not spec:
                    raise ConfigError(f"two plugins register a handler named {spec.name!r}")
                found[spec.name] = spec
        return found

    def ciphers(self) -> dict[str, Cipher]:
        found: dict[str, Cipher] = {}
        for ciphers in self.hook.relay_register_ciphers():
            for cipher in ciphers or ():
                if cipher.name in found:
                    raise ConfigError(f"two plugins register a cipher named {cipher.name!r}")
                found[cipher.name] = cipher
        return found

    def describe(self) -> list[PluginInfo]:
        """What ``relay plugins`` prints: one entry per registered plugin."""
        infos = []
        for name, plugin in self.list_name_plugin():
            if plugin is None:
                continue
            source = self.sources.get(name, "registered")
            version = self.versions.get(name) or getattr(plugin, "__version__", None)
            version = version or (_own_version() if source == "core" else "-")
            hooks = tuple(sorted(caller.name for caller in self.get_hookcallers(plugin) or ()))
            module = getattr(plugin, "__name__", type(plugin).__name__)
            infos.append(PluginInfo(name, source, version, module, hooks))
        return infos


def get_plugin_manager(extra: tuple[str | ModuleType | Any, ...] = (), *, entry_points: bool = True) -> RelayPluginManager:
    """A manager with the hook specs, the core plugin, every ``relay.plugins`` entry point and
    each of ``extra`` (module names to import, or plugin objects). ConfigError on any failure."""
    pm = RelayPluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(upstream, name="core")
    pm.sources["core"] = "core"
    if entry_points:
        _load_entry_points(pm)
    for item in extra:
        plugin = _import(item) if isinstance(item, str) else item
        name = getattr(plugin, "__name__", None) or repr(plugin)
        if pm.is_registered(plugin):
            continue
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise ConfigError(f"cannot register plugin {name}: {e}") from None
        pm.sources[name] = "--plugin"
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise ConfigError(f"plugin error: {e}") from None
    return pm


def _load_entry_points(pm: RelayPluginManager) -> None:
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken third-party plugin is a user error
                raise ConfigError(f"cannot load plugin {ep.name!r} ({ep.value}) from {dist.metadata['name']}: {e}") from None
            try:
                pm.register(plugin, name=ep.name)
            except (ValueError, pluggy.PluginValidationError) as e:
                raise ConfigError(f"cannot register plugin {ep.name!r} from {dist.metadata['name']}: {e}") from None
            pm.versions[ep.name] = dist.version
            own = _normalise(dist.metadata["name"]) == _normalise(DISTRIBUTION)
            pm.sources[ep.name] = "bundled" if own else f"entry point ({dist.metadata['name']})"


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot import plugin module {name!r}: {type(e).__name__}: {e}") from None


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _own_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
