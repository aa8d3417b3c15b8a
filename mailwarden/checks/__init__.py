"""Inbound checks. Each module has one async entry point returning a `CheckResult`."""
