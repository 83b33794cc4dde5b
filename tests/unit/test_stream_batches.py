"""``raytp.serve.server.ready_batches``: a stream's chunks cross the Ray hop to the ingress in lists of those ready
together, never waiting to fill one; errors and closing behave as on the plain stream."""

import asyncio

import pytest

from raytp.serve.server import ready_batches


def test_chunks_ready_together_travel_together_and_nothing_waits():
    async def main():
        gate = asyncio.Event()

        async def chunks():
            for i in range(3):  # three ready at once
                yield i
            await gate.wait()
            yield 3  # then one alone

        batches = ready_batches(chunks())
        await asyncio.sleep(0.01)  # the producer runs ahead while the consumer is busy
        first = await batches.__anext__()
        gate.set()
        return first, [b async for b in batches]

    first, rest = asyncio.run(main())
    assert first == [0, 1, 2] and rest == [[3]]


def test_an_error_ends_the_stream_after_the_chunks_before_it():
    async def chunks():
        yield "a"
        yield "b"
        raise ValueError("mid-stream")

    async def main():
        got = []
        with pytest.raises(ValueError, match="mid-stream"):
            async for batch in ready_batches(chunks()):
                got.append(batch)
        return got

    assert asyncio.run(main()) == [["a", "b"]]


def test_closing_the_batches_closes_the_stream():
    closed = []

    async def chunks():
        try:
            while True:
                yield "token"
                await asyncio.sleep(0.001)
        finally:
            closed.append(True)  # the engine generator's cleanup: it aborts the request

    async def main():
        batches = ready_batches(chunks())
        await batches.__anext__()
        await batches.aclose()

    asyncio.run(main())
    assert closed == [True]


def test_after_the_first_chunk_a_list_waits_for_stream_interval_items_or_the_end():
    """``stream_interval``: the first chunk goes alone at once (time to first token); then lists of at least
    ``min_items``, however the chunks trickle in; the end flushes what is left."""
    async def chunks():
        for i in range(10):
            await asyncio.sleep(0.002)  # one at a time: without the interval every list would hold one
            yield i

    async def main():
        return [b async for b in ready_batches(chunks(), 4)]

    batches = asyncio.run(main())
    assert batches[0] == [0] and [i for b in batches for i in b] == list(range(10))
    assert all(len(b) >= 4 for b in batches[1:-1]) and len(batches) <= 4
