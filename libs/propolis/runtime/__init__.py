"""The service runtime: components with a lifecycle, settings, health, HTTP probes, heartbeats.

A service is `run_service(NAME, SettingsClass, build)` where ``build(settings)``
returns its components; see `service.py`.
"""
