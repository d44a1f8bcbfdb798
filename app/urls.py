"""URLs the API answers (an artifact's download_url, a browser's download link), made where users reach the API.

Built from the request alone, such a URL names the address the request came to: behind a TLS proxy
in another container or host, that is http://api:8000, which the user cannot reach, and a dashboard
served over https that navigates there downloads over plain http or not at all. QLORA_PUBLIC_URL
names the address users reach (https://qlora.example.com, or with the path a proxy mounts the API
under, https://example.com/qlora); without it the request's address is used, as before."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import URL

from app.config import Settings


def public_url_for(request: Request, settings: Settings, name: str, **path_params: str) -> URL:
    """The absolute URL of route `name` as users reach it."""
    if settings.public_url is None:
        return request.url_for(name, **path_params)
    return URL(settings.public_url + str(request.app.url_path_for(name, **path_params)))
