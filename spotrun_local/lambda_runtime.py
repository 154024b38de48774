"""One warm Lambda container: imports the handler once, then serves invocations over stdin/stdout.

Run as ``python -P lambda_runtime.py`` with the cwd set to the function's code
folder, so ``sys.path`` is what Lambda gives a function (its code, the layers)
and nothing of the local cloud. It uses only the standard library for that reason.

Protocol: one JSON request per line on stdin (``event``, ``context``), one JSON
reply per line on the original stdout. The handler's own prints and logs go to
stderr, which the pool writes to the function's log file, as CloudWatch would.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback


class LambdaContext:
    """The attributes of Lambda's Python context object that handlers and powertools read."""

    def __init__(self, fields: dict) -> None:
        self.function_name = fields["function_name"]
        self.function_version = "$LATEST"
        self.invoked_function_arn = fields["invoked_function_arn"]
        self.memory_limit_in_mb = int(fields["memory_limit_in_mb"])
        self.aws_request_id = fields["aws_request_id"]
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = fields.get("log_stream_name", "local")
        self.identity = None
        self.client_context = None
        self._deadline = float(fields["deadline"])

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.time()) * 1000))


def _error(error: BaseException, error_type: str | None = None) -> dict:
    return {
        "errorMessage": str(error),
        "errorType": error_type or type(error).__name__,
        "stackTrace": traceback.format_exception(error),
    }


def _load_handler():
    module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return None, _error(error, "Runtime.ImportModuleError")
    except Exception as error:  # an error at init time fails every invocation, as on Lambda
        return None, _error(error)
    handler = getattr(module, function_name, None)
    if handler is None:
        missing = AttributeError(f"Handler '{function_name}' missing on module '{module_name}'")
        return None, _error(missing, "Runtime.HandlerNotFound")
    return handler, None


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # from here on, fd 1 (and so print()) is the function's log
    handler, init_error = _load_handler()
    for line in sys.stdin:
        request = json.loads(line)
        if init_error is not None:
            reply = {"error": init_error}
        else:
            try:
                result = handler(request["event"], LambdaContext(request["context"]))
            except Exception as error:
                reply = {"error": _error(error)}
            else:
                try:
                    reply = {"result": json.dumps(result)}
                except (TypeError, ValueError) as error:
                    reply = {"error": _error(error, "Runtime.MarshalError")}
        if "error" in reply:  # Lambda writes an unhandled error to the function's log too
            error = reply["error"]
            print(f"[ERROR] {error['errorType']}: {error['errorMessage']}", file=sys.stderr)
            print("".join(error.get("stackTrace") or []), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
