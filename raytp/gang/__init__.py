"""The rank side: code that runs in (or drives) a TP gang — executor, worker, model runner, sampler, loader.

Nothing here is imported by the API, the scheduler or the ingress; the engine reaches it only through the
``raytp.engine.protocol.Executor`` seam and the messages in ``raytp.messages``."""
