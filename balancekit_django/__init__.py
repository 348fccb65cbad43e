"""balancekit for Django: pools, backends and routes in settings and in the admin.

::

    INSTALLED_APPS = [..., "balancekit_django"]
    MIDDLEWARE = ["balancekit_django.middleware.BalanceMiddleware", ...]
    BALANCEKIT = {...}          # optional: the same schema as everywhere

Pools from ``BALANCEKIT`` and from the database are served side by side. A
change saved in the admin (or through the ORM) bumps a version row in the
same transaction; every worker polls that row every few seconds and reloads
the pools that changed, keeping the live state of the others.
"""
