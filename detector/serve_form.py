"""The service's multipart parser for /v1/inspect: starlette's, refusing a body that ends before its closing boundary.

python-multipart's parser never checks that the body it was fed ended (its finalize() is a no-op): a station's own
multipart writer that leaves out the closing `--BOUNDARY--`, or a body cut short where the HTTP message still ended
cleanly, lost its last part unseen, so a `meta` carrying a forcing risk flag was dropped and the truck released.
"""
from __future__ import annotations

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser


class ScanFormParser(MultiPartParser):
    """starlette's MultiPartParser that raises MultiPartException for a body without its closing boundary."""

    def on_end(self) -> None:
        """python-multipart calls it only on reading the closing boundary."""
        self._closed = True

    async def parse(self) -> FormData:
        self._closed = False
        form = await super().parse()
        if not self._closed:   # the last part was dropped, or is a part cut short: neither may be routed on
            await form.close()
            raise MultiPartException("the body ended before its closing boundary (--BOUNDARY--): a part may be "
                                     "missing or cut short; end the body with the boundary followed by --")
        return form
