"""The GPU side of qlora-service: Celery tasks and the training recipe."""
