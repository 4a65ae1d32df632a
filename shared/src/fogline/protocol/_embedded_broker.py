"""The embedded pure-Python broker (amqtt, MQTT 3.1.1), the last-resort development
broker when neither a configured broker nor ``mosquitto`` is available."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from ._errors import BrokerUnavailableError
from ._probes import free_port, wait_until_answers

__all__ = ["EmbeddedBroker"]

log = logging.getLogger("fogline.devbroker")


async def _shutdown_amqtt(broker: Any, timeout: float) -> None:
    """Shut amqtt down without leaving its port bound.

    amqtt's ``shutdown()`` first stops each client session, and that can wait forever
    for a reader that never reports stopping; only then does it close its listeners.
    So: close the listeners (the port is free whatever happens next), close each
    client's connection (the readers then stop), and only then call ``shutdown()``.
    The first two use amqtt internals, hence the getattr guards.
    """
    for server in list(getattr(broker, "_servers", {}).values()):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.close_instance(), timeout)
    for _session, handler in list(getattr(broker, "_sessions", {}).values()):
        writer = getattr(handler, "writer", None)
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.close(), timeout)
    try:
        await asyncio.wait_for(broker.shutdown(), timeout)
    except Exception:
        log.debug("embedded broker: shutdown did not finish cleanly", exc_info=True)


def _drain_and_close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt left running, let it unwind, then close the loop; closing
    with tasks pending leaves half-run coroutines that warn when collected."""
    try:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        # Connections amqtt still holds (e.g. one accepted mid-shutdown): close them
        # rather than leave the sockets to the garbage collector. ``_transports`` is
        # the selector loop's own registry; other loops simply have none.
        transports = list(getattr(loop, "_transports", {}).values())
        for transport in transports:
            if transport is not None and not transport.is_closing():
                transport.close()
        if transports:
            loop.run_until_complete(asyncio.sleep(0))  # run their close callbacks
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:
        log.debug("embedded broker: error while draining its event loop", exc_info=True)
    finally:
        loop.close()


class EmbeddedBroker:
    """The amqtt broker (MQTT 3.1.1) on its own event loop in a daemon thread."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise BrokerUnavailableError(
                "the embedded broker needs amqtt: pip install 'fogline-protocol[devbroker]'"
            ) from None
        # Only the anonymous-auth plugin: amqtt's defaults add packet logging and a
        # $SYS publisher, and its older "auth"/"topic-check" sections are deprecated.
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop
            assert loop is not None
            asyncio.set_event_loop(loop)
            try:
                try:
                    broker = Broker(config, loop=loop)
                    loop.run_until_complete(broker.start())
                    self._broker = broker  # only a started broker is shut down later
                except BaseException as exc:
                    errors.append(exc)
                    return
                finally:
                    started.set()
                loop.run_forever()
            finally:
                _drain_and_close(loop)

        self._thread = threading.Thread(target=run, name="fogline-amqtt", daemon=True)
        self._thread.start()
        started.wait(timeout)
        if errors:
            # The thread ends by itself, draining and closing its loop: let it finish
            # before stop() looks at that loop.
            self._thread.join(timeout)
        if errors or not wait_until_answers(self.host, self.port, timeout):
            self.stop()
            raise BrokerUnavailableError(f"embedded broker did not start: {errors[:1]}")

    def stop(self, timeout: float = 5.0) -> None:
        loop, broker, thread = self._loop, self._broker, self._thread
        if loop is None:
            return
        self._loop, self._broker, self._thread = None, None, None
        alive = thread is not None and thread.is_alive()
        if alive and broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(_shutdown_amqtt(broker, timeout), loop)
            with contextlib.suppress(Exception):
                future.result(timeout * 3)
        if alive:
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                loop.call_soon_threadsafe(loop.stop)
            assert thread is not None
            thread.join(timeout)  # the thread drains and closes its loop
        elif not loop.is_closed():
            loop.close()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
