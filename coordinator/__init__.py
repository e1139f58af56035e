"""The coordinator: registry, gradient relay, metrics and progress. It holds no weights."""
