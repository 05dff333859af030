"""Schemathesis against the gateway's own OpenAPI document, on a real gateway process.

Every generated request must get an answer that is not a server error, that has a status,
content type, headers and body the document declares, and an undeclared method gets 405.
Left out, on purpose:

- ``positive_data_acceptance``: a key the schema allows (any string) may still break a rule of
  ``gateway.keys`` (``..``, ``%2e``, controls): refusing it with 400 is the product.
- ``use_after_free`` / ``ensure_resource_availability``: a soft-deleted tenant stays readable by
  super admins (so it can be restored); schemathesis expects a deleted resource to 404.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

EXCLUDED = "positive_data_acceptance,use_after_free,ensure_resource_availability"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    config = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.ids": ["acme"],
        "auth.enabled": False,  # the authorization matrix covers credentials
    }
    with GatewayProcess(config) as gateway:
        result = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{gateway.url}/openapi.json",
                "--checks", "all", "--exclude-checks", EXCLUDED,
                "--max-examples", "20", "--workers", "1", "--seed", "1",
                "--request-timeout", "10", "--no-color",
            ],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )  # fmt: skip
        log = gateway.log_text()
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    assert "Traceback" not in log, log[-4000:]
