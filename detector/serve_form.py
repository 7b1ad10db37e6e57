"""The service's multipart parser for /v1/inspect: starlette's, taking the `scan` part as station clients send it and
refusing a body that ends before its closing boundary.

python-multipart's parser never checks that the body it was fed ended (its finalize() is a no-op): a station's own
multipart writer that leaves out the closing `--BOUNDARY--`, or a body cut short where the HTTP message still ended
cleanly, lost its last part unseen, so a `meta` carrying a forcing risk flag was dropped and the truck released.
starlette takes a part for a file only by its `filename` parameter: a scan part sent without one (.NET's
ByteArrayContent, Java's addBinaryBody(name, bytes)) or with only RFC 5987's `filename*` was read as text, and every
truck went to INSPECT; .NET's non-ASCII names were kept as the MIME word it puts in `filename` beside `filename*`.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from tempfile import SpooledTemporaryFile
from typing import TYPE_CHECKING
from urllib.parse import unquote

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

try:   # python-multipart's parse error from python-multipart itself: starlette.formparsers imports it only lately
    from python_multipart.exceptions import FormParserError
except ModuleNotFoundError:   # python-multipart before 0.0.13
    from multipart.exceptions import FormParserError

if TYPE_CHECKING:   # a part as starlette's parser keeps it: for type hints only (older starlettes do not name it)
    from starlette.formparsers import MultipartPart

SCAN_FIELD = "scan"
# one `; name=value` parameter of a header, its value a quoted string (with backslash escapes) or a token
# where python-multipart's messages say a position: within the chunk it was handed, not the body
_POSITION = re.compile(r"\s*(\(\d+\)|at (index )?\d+)$")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def extended_filename(disposition: bytes | None) -> str | None:
    """A Content-Disposition's RFC 5987 `filename*` (charset'language'percent-encoded text) decoded; None where it
    has none, or one that cannot be decoded (then its plain `filename` names the part)."""
    text = (disposition or b"").decode("latin-1")
    pos = text.find(";")
    while 0 <= pos < len(text):
        m = _PARAM.match(text, pos)
        if not m:
            return None
        if m.group(1).lower() == "filename*":
            value = m.group(2).strip().strip('"')
            if value.count("'") < 2:
                return None
            charset, _, rest = value.partition("'")
            try:
                return unquote(rest.partition("'")[2], encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                return None
        pos = m.end()
    return None


class ScanFormParser(MultiPartParser):
    """starlette's MultiPartParser that reads the part named `scan` as a file, named by its `filename*` where it
    has one, and raises MultiPartException for a body without its closing boundary."""

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.field_name != SCAN_FIELD:
            return
        if part.file is None:   # no `filename`: starlette would read the scan as text, 1 MB at most
            self._current_fields -= 1
            part.file = self._spooled_file(part)
        named = extended_filename(part.content_disposition)
        if named is not None:
            part.file.filename = named

    def _spooled_file(self, part: MultipartPart) -> UploadFile:
        """An UploadFile for `part`, counted and spooled as starlette does for a part with a `filename`."""
        self._current_files += 1
        if self._current_files > self.max_files:
            raise MultiPartException(f"Too many files. Maximum number of files is {self.max_files}.")
        spool = SpooledTemporaryFile(max_size=self.spool_max_size)
        self._files_to_close_on_error.append(spool)
        headers = Headers(raw=part.item_headers)
        return UploadFile(file=spool, size=0, filename=None, headers=headers)  # type: ignore[arg-type]

    async def _counted(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`stream`, keeping in self._fed how many bytes came before the chunk being parsed."""
        async for chunk in stream:
            self._fed += self._chunk
            self._chunk = len(chunk)
            yield chunk

    def on_end(self) -> None:
        """python-multipart calls it only on reading the closing boundary."""
        self._closed = True

    async def parse(self) -> FormData:
        self._closed, self._fed, self._chunk = False, 0, 0
        self.stream = self._counted(self.stream)
        try:
            form = await super().parse()
        except MultiPartException as e:   # starlette's "Invalid multipart data." alone named nothing to change
            if not isinstance(e.__cause__, FormParserError):
                raise
            offset = self._fed + (getattr(e.__cause__, "offset", None) or 0)
            raise MultiPartException(f"malformed at byte {offset} ({_POSITION.sub('', str(e.__cause__))}): each "
                                     "boundary line and part header (Name: value) ends in CRLF, and the body starts "
                                     "with --BOUNDARY") from e.__cause__
        if not self._closed:   # the last part was dropped, or is a part cut short: neither may be routed on
            await form.close()
            raise MultiPartException("the body ended before its closing boundary (--BOUNDARY--): a part may be "
                                     "missing or cut short; end the body with the boundary followed by --")
        return form


class ParserUnsupported(ValueError):
    """This starlette's multipart parser cannot be used as ScanFormParser needs (a private name it reaches changed)."""


def check_parser() -> None:
    """ParserUnsupported unless ScanFormParser reads a station's upload as it must: it reaches into starlette's
    parser, whose private names an upgrade may change, and then every truck would be answered INSPECT by a service
    that looks healthy; `detector serve` refuses to start instead."""
    head = Headers({"content-type": "multipart/form-data; boundary=B"})
    whole = (b"--B\r\nContent-Disposition: form-data; name=scan\r\n\r\nSCAN\r\n"
             b'--B\r\nContent-Disposition: form-data; name="meta"\r\n\r\n{}\r\n--B--\r\n')

    async def parse(body: bytes) -> tuple:
        async def stream() -> AsyncIterator[bytes]:
            yield body
        form = await ScanFormParser(head, stream(), max_files=2, max_fields=4).parse()
        scan = form.get(SCAN_FIELD)
        got = (await scan.read() if isinstance(scan, UploadFile) else scan), form.get("meta")
        await form.close()
        return got

    try:
        read = asyncio.run(parse(whole))
        try:
            asyncio.run(parse(whole[:-7]))   # without its closing boundary: must be refused
            cut = "accepted"
        except MultiPartException:
            cut = "refused"
    except Exception as e:   # any failure inside starlette's parser is what this guards against
        raise ParserUnsupported(f"the multipart parser of this starlette cannot read a station's upload "
                                f"({type(e).__name__}: {e}); install the starlette version the tests pass with") from None
    if read != (b"SCAN", "{}") or cut != "refused":
        raise ParserUnsupported(f"the multipart parser of this starlette reads a station's upload wrongly (scan and "
                                f"meta {read!r}, a body without its closing boundary {cut}); install the starlette "
                                "version the tests pass with")
