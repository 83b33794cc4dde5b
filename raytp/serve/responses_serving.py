"""The Responses API at the ingress: a Responses request is answered by one chat completion on the server
deployment (``raytp.api.responses`` translates both ways) and kept in the ingress's ``ResponseStore``.

Nothing here knows about HTTP: the ingress's routes pass the chat call in (``call_chat(body) -> awaitable chat
body`` or ``open_chat(body) -> the server's stream of chunk lists``) and frame what comes back. Errors are
``raytp.errors`` types: ``ResponseNotFoundError`` (404) for an unknown ``previous_response_id`` or id, and
whatever the chat call raised.
"""

from __future__ import annotations

import time

from raytp.api import responses as r
from raytp.errors import InvalidRequestError, RaytpError, ResponseNotFoundError
from raytp.serve.response_store import ResponseStore, StoredResponse


class ResponsesServing:
    """``to_error(exception) -> RaytpError``: how a failure in the middle of a stream is classified (and counted)
    before it becomes an ``error`` event."""

    def __init__(self, store: ResponseStore, to_error):
        self.store = store
        self.to_error = to_error

    async def create(self, req: r.ResponsesRequest, call_chat) -> dict:
        """The Response of a non-streamed request (stored if ``req.store``)."""
        history = self._history(req)
        chat = await call_chat(r.to_chat_body(req, history))
        response = r.from_chat(req, r.new_response_id(), int(time.time()), chat)
        self._keep(req, history, response)
        return response

    async def stream(self, req: r.ResponsesRequest, open_chat):
        """Lists of Responses events (those of one list of chat chunks). Errors before the first list (unknown
        previous id, invalid request, server at capacity) are raised, so they can still be plain HTTP errors; later
        ones end the stream with an ``error`` event. Closing this generator cancels the chat stream (which aborts
        the request in the engine)."""
        history = self._history(req)
        chunks = open_chat(r.to_chat_body(req, history))
        try:
            first = await chunks.__anext__()
            events = r.StreamEvents(req, r.new_response_id(), first[0]["model"] if first else req.model or "")
            yield events.start() + [e for chunk in first for e in events.feed(chunk)]
            try:
                async for batch in chunks:
                    out = [e for chunk in batch for e in events.feed(chunk)]
                    if out:
                        yield out
                done = events.finish()
                self._keep(req, history, events.response)
                yield done
            except Exception as e:  # noqa: BLE001 - mid-stream: the client gets an error event, not a broken stream
                err: RaytpError = self.to_error(e)
                yield [events.error(err.message, err.code or err.error_type, err.param)]
        finally:
            chunks.cancel()  # no-op when finished

    def retrieve(self, response_id: str) -> dict:
        return self._stored(response_id, "response_id").response

    def cancel(self, response_id: str) -> dict:
        """Only background responses can be cancelled, and this server runs none: a stored id is a 400 (vLLM's
        answer for a response that is not queued or in progress), an unknown one a 404."""
        self._stored(response_id, "response_id")
        raise InvalidRequestError("Cannot cancel a synchronous response.", param="response_id")

    def _stored(self, response_id: str, param: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(f"Response with id '{response_id}' not found (never stored, stored with "
                                        "store false, or evicted).", param=param)
        return stored

    def _history(self, req: r.ResponsesRequest) -> list[dict]:
        if req.previous_response_id is None:
            return []
        return list(self._stored(req.previous_response_id, "previous_response_id").conversation)

    def _keep(self, req: r.ResponsesRequest, history: list[dict], response: dict) -> None:
        if req.store:
            conversation = history + r.input_items(req) + r.output_items(response["output"])
            self.store.put(response["id"], StoredResponse(response, conversation))
