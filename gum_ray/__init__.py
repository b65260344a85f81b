"""gum-ray: urban areas at 10 m with the GlobalUrbanMapper (GUM) model, from a city to a continent."""

import os as _os

from gum_ray.quiet import WORKER_SETUP_ENV as _WORKER_SETUP_ENV
from gum_ray.version import __version__

if _os.environ.get(_WORKER_SETUP_ENV) == "1":  # a worker of a local Ray that gum-ray started
    from gum_ray.quiet import setup_worker as _setup_worker

    _setup_worker()  # the output rule, as the setup hook applies it where a job has a runtime env


def open_product(path, **kwargs):
    """Open a gum-ray global product as a lazily loaded (dask) xarray Dataset.

    See :func:`gum_ray.store.product.open_product`.
    """
    from gum_ray.store.product import open_product as _open

    return _open(path, **kwargs)
