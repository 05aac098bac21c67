"""The roof: the ``modelcast`` command over every component (see :mod:`modelcast_cli.main`)."""
