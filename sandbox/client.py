"""Python client of the sandbox service (and of any SandboxFusion-compatible ``/run_code`` server)."""

from __future__ import annotations

from types import TracebackType

import httpx

from sandbox.executor import RunResult

__all__ = ["RunResult", "SandboxClient", "SandboxUnavailable"]


class SandboxUnavailable(ConnectionError):
    """The service could not be reached, did not answer in time, failed (5xx), or did not start."""


def _detail(response: httpx.Response) -> str:
    """The service's one-line reason for an error status (its JSON ``detail``), else the raw body."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text


class SandboxClient:
    """Synchronous client; one instance may be shared by threads.

    ``timeout`` bounds each HTTP request in seconds, waiting in the service's queue included, so keep it
    above the largest ``run_timeout`` you send.
    """

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def run_code(
        self, code: str, stdin: str = "", run_timeout: float = 10.0, memory_limit_mb: int = 1024
    ) -> RunResult:
        """Run ``code`` with Python in the sandbox.

        Raises SandboxUnavailable when the service cannot answer, ValueError when it rejects the request
        (the service's reason in the message, e.g. a run_timeout above its maximum).
        """
        payload = {
            "code": code,
            "stdin": stdin,
            "language": "python",
            "run_timeout": run_timeout,
            "memory_limit_MB": memory_limit_mb,
        }
        try:
            response = self._http.post("/run_code", json=payload)
        except httpx.HTTPError as error:
            raise SandboxUnavailable(f"sandbox at {self.base_url} unreachable: {error!r}") from error
        if response.status_code >= 500:
            raise SandboxUnavailable(f"sandbox at {self.base_url} failed: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ValueError(
                f"sandbox rejected the request (HTTP {response.status_code}): {_detail(response)}"
            )
        body = response.json()
        run = body.get("run_result") or {}
        return RunResult(
            status=run.get("status") or "Error",
            stdout=run.get("stdout") or "",
            stderr=run.get("stderr") or "",
            return_code=run.get("return_code"),
            execution_time=run.get("execution_time") or 0.0,
            truncated=bool(run.get("truncated", False)),
            message=body.get("message") or "",
        )

    def health(self) -> bool:
        """True when the service answers ``GET /health`` with status ok; False if unreachable or unwell."""
        try:
            return bool(self._http.get("/health", timeout=5.0).json().get("status") == "ok")
        except (httpx.HTTPError, ValueError, AttributeError):  # unreachable, or not this service
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
