"""The provider portal and the landing page: Loupe in the browser for people who are not staff.

Reads start from ``Model.objects.visible_to(user)`` (:mod:`governance.access`); state changes call
:mod:`governance.workflow` and :mod:`governance.pipeline`; uploads and new cases go through the REST
API itself (the page's script posts to it with the session), so every rule the API enforces holds
here without a second copy.
"""
