"""An example third-party pyproxy filter: adds a configured header to every response.

Config: `{header: x-stamped-by, value: pyproxy}` (both optional).
"""

from __future__ import annotations

from pyproxy.chain.api import CONTINUE, FilterConfigError, FilterFactory, HttpFilter


class HeaderStampFactory(FilterFactory):
    name = "header_stamp"
    modes = ("http", "grpc")
    counter_names = ("stamped",)

    @classmethod
    def validate(cls, config: dict) -> dict:
        header = config.pop("header", "x-stamped-by")
        value = config.pop("value", "pyproxy")
        if not isinstance(header, str) or not header or any(c in header for c in " \t\r\n:"):
            raise FilterConfigError("header", "expected a header name")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise FilterConfigError("value", "expected a single-line string")
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        return {"header": header.lower(), "value": value}

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        self.header = config["header"].encode()
        self.value = config["value"].encode()

    def create(self) -> HeaderStampFilter:
        return HeaderStampFilter(self)


class HeaderStampFilter(HttpFilter):
    __slots__ = ("factory", "callbacks")

    def __init__(self, factory: HeaderStampFactory) -> None:
        self.factory = factory

    def encode_headers(self, headers, end_stream: bool) -> int:
        headers.set(self.factory.header, self.factory.value)
        self.factory.counters[0] += 1
        return CONTINUE


HeaderStampFactory.filter_class = HeaderStampFilter
