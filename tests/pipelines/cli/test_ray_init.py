"""Tests for pipelines/cli/ray_init.py's quiet console: what it drops and what it keeps."""

from __future__ import annotations

import logging

from pipelines.cli.ray_init import AUTH_LOGGER, _drop_record, quiet_ray_data_console


def _record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_ray_data_console_keeps_warnings_and_drops_no_action_lines() -> None:
    quiet_ray_data_console()
    quiet_ray_data_console()  # once only
    consoles = [
        h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)
    ]
    assert consoles
    for handler in consoles:
        assert len(handler.filters) == len({type(f) for f in handler.filters})
        assert not handler.filter(_record("ray.data", logging.INFO, "Starting execution of X"))
        disabled = "Progress bars disabled. To enable, set ..."
        assert not handler.filter(_record("ray.data", logging.WARNING, disabled))
        assert handler.filter(_record("ray.data", logging.WARNING, "Cluster resources are not"))
    files = [
        h
        for h in logging.getLogger("ray.data").handlers
        if not isinstance(h, logging.StreamHandler)
    ]
    for handler in files:  # ray-data.log keeps everything
        assert handler.filter(_record("ray.data", logging.INFO, "Starting execution of X"))


def test_the_token_auth_notice_alone_is_dropped() -> None:
    _drop_record(AUTH_LOGGER, "Token authentication is enabled")
    _drop_record(AUTH_LOGGER, "Token authentication is enabled")
    logger = logging.getLogger(AUTH_LOGGER)
    assert len(logger.filters) == 1
    assert not logger.filter(
        _record(AUTH_LOGGER, logging.WARNING, "Token authentication is enabled for this")
    )
    assert logger.filter(_record(AUTH_LOGGER, logging.WARNING, "Token authentication is disabled"))
