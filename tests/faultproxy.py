"""A TCP proxy with faults, between daemons and PostgreSQL.

proxy = await FaultProxy.start("127.0.0.1", 5432)   # proxy.port is where to connect
proxy = await FaultProxy.start("127.0.0.1", 5432, listen="10.1.2.1")   # e.g. a bridge
proxy.cut()        # drop every connection, refuse (accept and close) new ones
proxy.restore()
proxy.latency = 0.05   # seconds added to every chunk, both ways
"""

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, host: str, port: int, listen: str) -> None:
        self._target = (host, port)
        self.listen = listen
        self.port = 0
        self.latency = 0.0
        self.accepted = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, host: str, port: int, listen: str = "127.0.0.1") -> "FaultProxy":
        proxy = cls(host, port, listen)
        proxy._server = await asyncio.start_server(proxy._client, listen, 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host:port replaced by the proxy's."""
        host_port = f"{self._target[0]}:{self._target[1]}"
        assert host_port in dsn, dsn
        return dsn.replace(host_port, f"{self.listen}:{self.port}")

    def cut(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(chunk)
                await writer.drain()
