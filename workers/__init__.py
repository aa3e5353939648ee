"""A Celery worker fleet that shares one LLM budget: the runnable example of ``xflow_dist.celery``.

``workers.app`` is the Celery application (configured from ``XFLOW_*``), ``workers.tasks`` the
tasks, ``python -m workers.fleet`` starts N worker nodes, ``python -m workers.producer`` enqueues a
job list. See ``docs/celery.md``.
"""
