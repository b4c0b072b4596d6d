"""The HTTP door: Hugging Face task schema, qaserve JSON and Open Inference Protocol v2 routes on uvicorn."""

from qaserve.api.http.app import create_http_app
from qaserve.api.http.door import HttpDoor
from qaserve.api.http.listener import HttpListener, bind

__all__ = ["HttpDoor", "HttpListener", "bind", "create_http_app"]
