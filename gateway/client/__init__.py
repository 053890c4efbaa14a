"""The client role of the gateway package: the async client (one DEALER socket on one loop) and
the one sync facade (``Client``, ``Job``) that the Python API, the magic, the kernel and the CLI
share.
"""

from gateway.client._job import Job
from gateway.client._queries import dashboard_link, job_stats
from gateway.client._sync import Client
from gateway.client._video import filmstrip

__all__ = ["Client", "Job", "dashboard_link", "filmstrip", "job_stats"]
