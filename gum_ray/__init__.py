"""gum-ray: urban areas at 10 m with the GlobalUrbanMapper (GUM) model, from a city to a continent."""

from gum_ray.version import __version__


def open_product(path, **kwargs):
    """Open a gum-ray global product as a lazily loaded (dask) xarray Dataset.

    See :func:`gum_ray.store.product.open_product`.
    """
    from gum_ray.store.product import open_product as _open

    return _open(path, **kwargs)
