"""Every call that waits takes a timeout, and a negative or NaN one raises ValueError at once
(README, API): the serving loops too, not only the port calls.

CompletionPort.serve(timeout) took a negative timeout for "stop at the first tick" and a NaN
one for "never stop of quiet" (the comparison with NaN is always false); rpc.Server's
serve_forever(timeout) returned at once for both, and stop(timeout) with NaN waited for no
running call.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading

import pytest

import alpc
from alpc import rpc

pytestmark = pytest.mark.timeout(60)

BAD = [-1.0, math.nan]


class Echo(rpc.Interface, name="serving.timeouts.echo"):
    @rpc.method
    def echo(self, value: int) -> int:
        return value


@pytest.mark.parametrize("timeout", BAD, ids=["negative", "nan"])
def test_completion_port_serve_refuses_a_bad_timeout(broker, config, timeout: float) -> None:  # type: ignore[no-untyped-def]
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            completion.serve(timeout=timeout)
        except BaseException as exc:  # reported below
            raised.append(exc)

    with alpc.create_port("serving.timeouts.cpt", config=config, timeout=10) as port:
        completion = alpc.CompletionPort(port, lambda message: b"")
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        thread.join(10)  # a bound, not a synchronisation: with the bug a NaN serve() never returns
        if thread.is_alive():
            completion.stop()
            thread.join(10)
            pytest.fail(f"serve(timeout={timeout}) was still serving instead of raising ValueError")
    assert raised and isinstance(raised[0], ValueError), f"serve(timeout={timeout}) -> {raised!r}"


@pytest.mark.parametrize("timeout", BAD, ids=["negative", "nan"])
def test_rpc_server_refuses_a_bad_timeout(broker, config, timeout: float) -> None:  # type: ignore[no-untyped-def]
    server = rpc.Server("serving.timeouts.rpc", Echo(), config=config)
    try:
        with pytest.raises(ValueError, match="timeout"):
            server.serve_forever(timeout=timeout)
        with pytest.raises(ValueError, match="timeout"):
            server.stop(timeout=timeout)
    finally:
        server.stop()


@pytest.mark.parametrize("timeout", [-1.0, math.nan])
def test_flush_and_cancel_refuse_a_bad_timeout_with_nothing_to_do(broker, config, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """With nothing queued (flush) or an id not in flight (cancel) a bad timeout returned
    normally; it is refused as every other wait refuses it."""
    with alpc.create_port("serving.timeouts.flush", config=config, timeout=10) as port, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = pool.submit(alpc.connect, "serving.timeouts.flush", config=config, timeout=10)
        with port.listen(timeout=10).accept(), client.result(timeout=10) as comm:
            with pytest.raises(ValueError):
                comm.flush(timeout)
            with pytest.raises(ValueError):
                comm.cancel(12345, timeout)


@pytest.mark.parametrize("options", [{"idle_timeout": math.nan}, {"idle_timeout": -1.0}, {"idle_timeout": "5"},
                                     {"max_workers": 2.5}, {"min_workers": True}])
def test_completion_port_refuses_bad_pool_options(broker, config, options: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    """A NaN idle_timeout made every extra thread retire at once; a float worker count failed
    later, inside serve()."""
    with alpc.create_port("serving.timeouts.pool", config=config, timeout=10) as port:
        with pytest.raises((ValueError, TypeError)):
            alpc.CompletionPort(port, lambda message: b"", **options)  # type: ignore[arg-type]
