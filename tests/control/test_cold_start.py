"""Cold-start hygiene of every function: what importing its app.py pulls in.

Timing is measured by hand (README / report), not here: a shared CI machine makes
timings flaky. What is checked is the cause of slow cold starts: heavy packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.control.conftest import FUNCTIONS, REPO

# docs/contracts.md: nothing under layers/ or functions/ imports these.
FORBIDDEN = ("torch", "numpy", "moto", "spotrun_trainer", "pandas", "matplotlib")
HANDLERS = sorted(path.parent.name for path in FUNCTIONS.glob("*/app.py"))

PROBE = """
import json, sys
import app
assert callable(app.lambda_handler)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported_top_level_modules(function: str) -> set[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # The layer's library, exactly as Lambda puts it on the path; nothing of the repo.
        "PYTHONPATH": str(REPO / "layers" / "spotrun"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "POWERTOOLS_SERVICE_NAME": "spotrun-test",
        "POWERTOOLS_METRICS_NAMESPACE": "SpotrunTest",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    completed = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=FUNCTIONS / function,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_cold_start_handlers_exist():
    # GIVEN the function folders of the job side
    # THEN each has an app.py
    assert {"jobs_api", "submit_job_file", "handle_execution_ended", "sweep_orphans"} <= set(
        HANDLERS
    )


@pytest.mark.parametrize("function", HANDLERS)
def test_cold_start_handler_imports_no_heavy_packages(function):
    # GIVEN a function folder
    # WHEN its app.py is imported cold, in a fresh interpreter, with only the layer
    modules = imported_top_level_modules(function)
    # THEN none of the forbidden packages came along
    assert modules.isdisjoint(FORBIDDEN), sorted(modules & set(FORBIDDEN))
