"""The ``nxm-deploy`` command line."""
