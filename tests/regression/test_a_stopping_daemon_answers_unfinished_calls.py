"""A call still running when vfiod stops gets a named error, and the log no traceback.

Before, the task of an unfinished call was cancelled as the daemon's loop shut
down, and the completion callback let the CancelledError escape: asyncio
logged "Exception in callback ... done" with a traceback, and the client
heard nothing until its own timeout."""

import asyncio
import logging

from dbus_next import Message, MessageType
from dbus_next.service import ServiceInterface, method

from vfiod.daemon.connection import VfiodBus
from vfiod.wire import BUS_NAME, PatientBus

class Slow(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.vfiod1.Manager")
        self.started = asyncio.Event()

    @method()
    async def RequestLease(self) -> "s":  # noqa: F821  (a D-Bus signature, not a type)
        self.started.set()
        await asyncio.Event().wait()           # never finishes by itself
        return "never"


def test_a_call_cut_short_by_the_stop_is_answered_with_a_named_error(bare_bus, caplog):
    async def main():
        server = await VfiodBus(bus_address=bare_bus).connect()
        iface = Slow()
        server.export("/org/vfiod1", iface)
        await server.request_name(BUS_NAME)
        client = await PatientBus(bus_address=bare_bus).connect()
        reply = asyncio.ensure_future(client.call(Message(
            destination=BUS_NAME, path="/org/vfiod1", interface="org.vfiod1.Manager",
            member="RequestLease")))
        await asyncio.wait_for(iface.started.wait(), 10)
        # what asyncio.run does to the tasks left when the daemon's main coroutine returns
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task() and task is not reply and "RequestLease" in repr(task):
                task.cancel()
        answer = await asyncio.wait_for(reply, 10)
        server.disconnect()
        client.disconnect()
        return answer

    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(main())
    assert answer.message_type == MessageType.ERROR, answer.body
    assert answer.error_name == "org.vfiod1.Error.BackendFailed"
    assert answer.body == ["vfiod stopped before RequestLease finished"]
    assert not [r for r in caplog.records if r.exc_info or "Exception in callback" in r.getMessage()]
