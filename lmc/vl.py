"""Images for vision-language workspaces, as LMDeploy's `lmdeploy.vl.load_image`:

    from lmc.vl import load_image
    image = load_image("cat.jpg")            # a path, an http(s) URL, a base64 data URL or a PIL image
    print(pipe(("describe this image", image)).text)

Every image is decoded within bounds (bytes, pixels; lmc.runtime.image_processing) and comes back as an RGB
PIL image; anything unreadable is one LmcError line.
"""
from __future__ import annotations

import base64
import binascii
import os
import time
from pathlib import Path

from lmc.errors import LmcError
from lmc.runtime.image_processing import MAX_IMAGE_BYTES, decode_image, to_rgb

FETCH_TIMEOUT_S = 10.0  # per socket operation
FETCH_TOTAL_S = 30.0  # the whole download (a server that drips bytes holds a request no longer)


def load_image(image, allowed_dir: str | os.PathLike | None = None, local_files: bool = True,
               media_domains: tuple[str, ...] | None = None, public_only: bool = False):
    """A PIL image, a path, an http(s) URL or a `data:image/...;base64,` URL -> an RGB PIL image.
    `local_files=False` refuses paths; `allowed_dir` confines them to that folder (symlinks resolved).
    URLs (and every redirect they take): `media_domains` limits them to those hosts; else `public_only` refuses
    hosts that resolve to a loopback, private, link-local or otherwise non-global address (a server's guard
    against requests that make it fetch from its own network)."""
    try:
        from PIL import Image
    except ImportError:
        raise LmcError("images need Pillow: pip install pillow") from None
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, bytes):
        return decode_image(image)
    if not isinstance(image, (str, os.PathLike)):
        raise LmcError(f"an image is a path, a URL or a PIL image, got {type(image).__name__}")
    ref = os.fspath(image)
    if ref.startswith("data:"):
        return decode_image(_data_url(ref), "the data URL's image")
    if ref.startswith(("http://", "https://")):
        return decode_image(_fetch(ref, media_domains, public_only), ref[:100])
    ref = ref.removeprefix("file://")
    if "://" in ref[:16]:
        raise LmcError(f"image URL {ref[:60]!r}: lmc reads http(s) URLs, data URLs and local paths")
    return decode_image(_read_local(ref, allowed_dir, local_files), ref)


def _data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise LmcError("a data URL image must be `data:image/<type>;base64,<data>`")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise LmcError(f"the data URL's image is over {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LmcError("the data URL's base64 data is malformed") from None


def _check_url(url: str, media_domains: tuple[str, ...] | None) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise LmcError(f"image URL {url[:100]!r}: lmc fetches http(s) URLs with a host")
    if media_domains is not None and host not in {d.lower() for d in media_domains}:
        raise LmcError(f"image URL host {host!r} is not one of --allowed-media-domains; send a data URL")


def _connect_public(host: str, port: int, timeout) -> "socket.socket":
    """A TCP connection to `host`, resolved once here, after every address it resolves to was found public:
    the connection goes to an address that was checked, so a name that resolves to a public address for a check
    and to a private one for the connection (DNS rebinding) cannot reach this server's own network."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise LmcError(f"could not resolve the image host {host!r} ({e})") from None
    for *_, sockaddr in infos:
        if not ipaddress.ip_address(sockaddr[0].split("%")[0]).is_global:
            raise LmcError(f"image URL host {host!r} is a non-public address ({sockaddr[0]}); this server fetches "
                           "public hosts only (start it with --allowed-media-domains HOST to allow one), or send "
                           "a data URL")
    error: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def _public_only_handlers() -> list:
    """urllib handlers whose connections go through _connect_public (plain and TLS; no proxy, whose address is
    not the one to check)."""
    import http.client
    import ssl
    import urllib.request

    class PublicHTTP(http.client.HTTPConnection):
        def connect(self):
            self.sock = _connect_public(self.host, self.port, self.timeout)

    class PublicHTTPS(http.client.HTTPSConnection):
        def connect(self):
            self.sock = self._context.wrap_socket(_connect_public(self.host, self.port, self.timeout),
                                                  server_hostname=self.host)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(PublicHTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(PublicHTTPS, req, context=ssl.create_default_context())

    return [urllib.request.ProxyHandler({}), HTTPHandler(), HTTPSHandler()]


def _fetch(url: str, media_domains: tuple[str, ...] | None = None, public_only: bool = False) -> bytes:
    import urllib.error
    import urllib.request

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            _check_url(newurl, media_domains)  # a redirect gets the first URL's rules
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    _check_url(url, media_domains)
    pinned = public_only and media_domains is None  # every connection's address is checked as it is made
    opener = urllib.request.build_opener(CheckedRedirects, *(_public_only_handlers() if pinned else ()))
    deadline = time.monotonic() + FETCH_TOTAL_S
    data = bytearray()
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "lmc"}), timeout=FETCH_TIMEOUT_S) as r:
            while len(data) <= MAX_IMAGE_BYTES:
                chunk = r.read1(min(1 << 16, MAX_IMAGE_BYTES + 1 - len(data)))  # what has arrived, up to the limit
                if not chunk:
                    break
                data += chunk
                if time.monotonic() > deadline:
                    raise LmcError(f"the image at {url[:100]} took more than {FETCH_TOTAL_S:g} s to download; "
                                   "download it and pass the file")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LmcError(f"could not fetch the image {url[:100]} ({e}); download it and pass the file") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise LmcError(f"the image at {url[:100]} is over {MAX_IMAGE_BYTES} bytes")
    return bytes(data)


def _read_local(ref: str, allowed_dir, local_files: bool) -> bytes:
    if not local_files:
        raise LmcError("local image paths are not accepted here; send a data URL (or start the server with "
                       "--allowed-local-media-path DIR)")
    path = Path(ref)
    if allowed_dir is not None:
        base, real = Path(allowed_dir).resolve(), path.resolve()
        if base != real and base not in real.parents:
            raise LmcError(f"image path {ref[:100]!r} is outside the allowed folder {allowed_dir}")
    if not path.is_file():
        raise LmcError(f"image {ref[:100]} is not a file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise LmcError(f"image {ref[:100]} is over {MAX_IMAGE_BYTES} bytes")
    return path.read_bytes()


def message_images(messages: list[dict], **rules) -> list:
    """The images of messages' content parts, in order, loaded: OpenAI's `{"type": "image_url", "image_url":
    {"url": ...}}` and `{"type": "image", "image": <PIL image or path>}` (rules: load_image's)."""
    images = []
    for m in messages:
        for part in m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                images.append(load_image(url.get("url") if isinstance(url, dict) else url, **rules))
            elif kind == "image":
                images.append(load_image(part.get("image"), **rules))
    return images
