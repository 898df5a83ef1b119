"""stride's online half: HTTP API, batching policy, queue (in-process or Redis Streams), workers, metrics."""
