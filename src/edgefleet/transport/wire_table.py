"""The wire table, generated from :mod:`edgefleet.transport.schemas` by ``python -m edgefleet.transport.schemas``:
do not edit. Released dictionary versions are never changed (devices in the field compress with them).
"""

from __future__ import annotations

DICTIONARY_VERSION = 2
"""The version this release packs with (:mod:`edgefleet.transport.compact`)."""

DICTIONARIES: dict[int, dict[str, bytes]] = {
    1: {
        "telemetry": (
            b'"device":,"seq":,"ts":,"model":,"windows":,"labelled":0,"correct":0,"classes":,"latency_ms":,"co'
            b'nfidence":,"skipped":0,"errors":0,"shadow_model":,"shadow_windows":0,"shadow_agree":0,"shadow_er'
            b'rors":0,"shadow_latency_ms":,"shadow_labelled":0,"shadow_correct":0,"shadow_active_latency_ms":,'
            b'"outbox_dropped":0,"imputed":0,"incomplete":0,"uncertain":0,"alerts":,"drift":,"hard_examples":,'
            b'"hard_left_out":0,"escalations":,"trigger_skipped":0,"predicted":,"confidence":,"shape":,"encodi'
            b'ng":"f16","encoding":"f16+zlib","encoding":"i8","encoding":"i8+zlib","data":,"scale":,"ts":,"n":'
            b',"mean_z":,"std_ratio":,"score":,"psi":'
        ),
        "events": (
            b'"device":,"seq":,"ts":,"kind":"update","kind":"alert","kind":"agent","name":,"detail":'
        ),
        "reported": (
            b'"device":,"agent_version":,"active":,"active_sha256":,"previous":,"shadow":,"running":,"active_e'
            b'xpired":false,"update_state":"idle","last_error":,"hardware":,"profile":,"runtimes":,"public_key'
            b'":,"ts":,"changes":1'
        ),
    },
    2: {
        "telemetry": (
            b'"device":,"seq":,"ts":,"model":,"windows":,"labelled":0,"correct":0,"classes":,"latency_ms":,"co'
            b'nfidence":,"skipped":0,"errors":0,"shadow_model":,"shadow_windows":0,"shadow_agree":0,"shadow_er'
            b'rors":0,"shadow_latency_ms":,"shadow_labelled":0,"shadow_correct":0,"shadow_active_latency_ms":,'
            b'"outbox_dropped":0,"imputed":0,"incomplete":0,"uncertain":0,"alerts":,"drift":,"hard_examples":,'
            b'"hard_left_out":0,"escalations":,"trigger_skipped":0,"predicted":,"confidence":,"shape":,"encodi'
            b'ng":"f16","encoding":"f16+zlib","encoding":"i8","encoding":"i8+zlib","data":,"scale":,"ts":,"n":'
            b',"mean_z":,"std_ratio":,"score":,"psi":'
        ),
        "events": (
            b'"device":,"seq":,"ts":,"kind":"update","kind":"alert","kind":"agent","name":,"detail":'
        ),
        "reported": (
            b'"device":,"agent_version":,"active":,"active_sha256":,"previous":,"shadow":,"running":,"active_e'
            b'xpired":false,"update_state":"idle","last_error":,"hardware":,"profile":,"runtimes":,"public_key'
            b'":,"facts":,"ts":,"cpu":,"machine":,"cores":,"memory_mb":,"runtimes":,"providers":,"changes":1'
        ),
    },
}

FIELDS: dict[str, dict[str, bool]] = {
    "TelemetryBatch": {
        "device": True, "seq": True, "ts": True, "model": False, "windows": True, "labelled": False,
        "correct": False, "classes": False, "latency_ms": False, "confidence": False, "skipped": False,
        "errors": False, "shadow_model": False, "shadow_windows": False, "shadow_agree": False,
        "shadow_errors": False, "shadow_latency_ms": False, "shadow_labelled": False, "shadow_correct": False,
        "shadow_active_latency_ms": False, "outbox_dropped": False, "imputed": False, "incomplete": False,
        "uncertain": False, "alerts": False, "drift": False, "hard_examples": False, "hard_left_out": False,
        "escalations": False, "trigger_skipped": False,
    },
    "HardExample": {
        "predicted": True, "confidence": True, "shape": True, "encoding": False, "data": True, "scale": False,
        "ts": False,
    },
    "DriftStats": {
        "n": True, "mean_z": False, "std_ratio": False, "score": False, "psi": False,
    },
    "Event": {
        "device": True, "seq": True, "ts": False, "kind": True, "name": True, "detail": False,
    },
    "ReportedState": {
        "device": True, "agent_version": True, "active": False, "active_sha256": False, "previous": False,
        "shadow": False, "running": False, "active_expired": False, "update_state": False, "last_error": False,
        "hardware": False, "profile": False, "runtimes": False, "public_key": False, "facts": False,
        "ts": False,
    },
    "DeviceFacts": {
        "cpu": False, "machine": False, "cores": False, "memory_mb": False, "runtimes": False,
        "providers": False,
    },
    "DesiredState": {
        "device": True, "model": False, "shadow": False, "statements": False, "issued_at": False,
        "mqtt_url": False, "telemetry_interval_s": False,
    },
    "ModelRef": {
        "name": True, "version": True, "release": True, "sha256": True, "size": True, "url": True,
        "delta_url": False, "delta_base_sha256": False, "delta_size": False, "rollback_order": False,
        "wrapped_key": False,
    },
}
"""Every message's fields and whether each is required: the agent's light twins are held to it."""
