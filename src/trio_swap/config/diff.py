"""What a config reload changes, model by model (the rules in docs/reload.md).

A model's settings fall in two kinds. The *process* settings (``cmd``,
``cmdStop``, ``proxy``, ``checkEndpoint``, ``env``) describe the server
process: a running process cannot take new ones, so a change means a restart
with the new ones. Everything else (ttl, aliases, filters, name,
concurrencyLimit, unloadTimeout, ...) is read by trio-swap per request or per
decision, so it is applied in place and the process keeps running: editing a
TTL or an alias never reloads a 70B model. ``sleep:`` is of the second kind
too: its calls are HTTP requests trio-swap sends, not how the process was
started, so a changed ``sleep:`` applies in place (a model asleep at the
reload is woken with the calls that put it to sleep; docs/sleep.md).
"""

from __future__ import annotations

from typing import Final, final

import msgspec

from trio_swap.config.model import Config, ModelConfig

__all__ = [
    "COMPARED_ELSEWHERE",
    "NOT_RELOADED",
    "PROCESS_FIELDS",
    "SETTINGS",
    "ConfigDiff",
    "diff_configs",
    "same_process",
]

#: The ModelConfig fields a running server process was started with.
PROCESS_FIELDS: Final = ("cmd", "cmd_stop", "proxy", "check_endpoint", "env")

#: Config field -> the YAML key a user knows it by, for top-level settings.
SETTINGS: Final = {
    "health_check_timeout": "healthCheckTimeout",
    "start_port": "startPort",
    "log_level": "logLevel",
    "log_to_stdout": "logToStdout",
    "log_time_format": "logTimeFormat",
    "log_requests": "logRequests",
    "session_id_headers": "ui",
    "ignore_paths": "upstream",
    "preload": "hooks",
    "api_keys": "apiKeys",
    "allowed_hosts": "allowedHosts",
    "include_aliases_in_list": "includeAliasesInList",
    "peers": "peers",
    "metrics_max_in_memory": "metricsMaxInMemory",
    "store_path": "store",
    "store_max_rows": "store",
    "capture_buffer": "captureBuffer",
    "resources": "resources",
    "cache_disk_budget": "cacheDiskBudget",
    "prefetch": "prefetch",
    "sleep_ttl": "sleepTTL",
    "performance": "performance",
    "selectors": "selectors",
    "profiles": "profiles",
}
#: Config fields compared some other way, or not settings at all. Every Config
#: field is in exactly one of these two tables (a test checks it), so a new
#: setting cannot be silently left out of a reload's report.
COMPARED_ELSEWHERE: Final = frozenset(
    {"source", "models", "routing", "peer_names", "model_names", "warnings", "ports"}
)
#: Top-level keys a reload reads but does not apply (they need a restart of trio-swap).
NOT_RELOADED: Final = {
    "logLevel": "logLevel is applied when trio-swap starts; restart it to change the level",
    "logToStdout": "logToStdout is applied when trio-swap starts; restart it to change it",
    "logTimeFormat": "logTimeFormat is applied when trio-swap starts; restart it to change it",
    "hooks": "hooks.on_startup.preload runs when trio-swap starts, not on a reload",
    "metricsMaxInMemory": "metricsMaxInMemory is applied when trio-swap starts",
    "store": "store (the activity log file) is opened when trio-swap starts",
}


def same_process(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a server started with ``old`` is exactly what ``new`` would start."""
    return all(getattr(old, name) == getattr(new, name) for name in PROCESS_FIELDS)


@final
class ConfigDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Model ids by what a reload does to them, each in the new (or old) config's order."""

    added: tuple[str, ...] = ()
    #: Stopped once their requests in flight finish; their names 404 at once.
    removed: tuple[str, ...] = ()
    #: Any setting differs (``restart`` lists those whose process settings differ).
    changed: tuple[str, ...] = ()
    #: The changed models whose running process is replaced: stopped once idle,
    #: started with the new settings on their next request.
    restart: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Top-level keys that differ (``apiKeys``, ``peers``, ``groups``, ...).
    settings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.settings)

    def describe(self) -> str:
        """One log line: ``added: c; removed: a; changed: b (restart); unchanged: 2``."""
        parts: list[str] = []
        if self.added:
            parts.append("added: " + ", ".join(self.added))
        if self.removed:
            parts.append("removed: " + ", ".join(self.removed))
        if self.changed:
            marked = [f"{m} (restart)" if m in self.restart else m for m in self.changed]
            parts.append("changed: " + ", ".join(marked))
        parts.append(f"unchanged: {len(self.unchanged)}")
        if self.settings:
            parts.append("settings: " + ", ".join(self.settings))
        return "; ".join(parts)


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two loaded configs (``${PORT}`` already assigned, so a renumbered
    port shows as a changed ``cmd``)."""
    changed: list[str] = []
    restart: list[str] = []
    unchanged: list[str] = []
    for model_id, model in new.models.items():
        before = old.models.get(model_id)
        if before is None:
            continue
        if before == model:
            unchanged.append(model_id)
            continue
        changed.append(model_id)
        if not same_process(before, model):
            restart.append(model_id)
    settings: list[str] = []
    for name, key in SETTINGS.items():
        if getattr(old, name) != getattr(new, name) and key not in settings:
            settings.append(key)
    settings.extend(_routing_changes(old, new))
    return ConfigDiff(
        added=tuple(m for m in new.models if m not in old.models),
        removed=tuple(m for m in old.models if m not in new.models),
        changed=tuple(changed),
        restart=tuple(restart),
        unchanged=tuple(unchanged),
        settings=tuple(settings),
    )


def _routing_changes(old: Config, new: Config) -> list[str]:
    before, after = old.routing, new.routing
    keys: list[str] = []
    if before.router != after.router:
        keys.append("routing.router")
    if before.groups != after.groups:
        keys.append("groups")
    if before.matrix != after.matrix:
        keys.append("matrix")
    if before.scheduler != after.scheduler:
        keys.append("routing.scheduler")
    return keys
