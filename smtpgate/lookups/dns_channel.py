"""dns_channel - one c-ares channel (its sockets and timeouts) driven by an asyncio event loop.

SYNOPSIS
    DnsChannel(loop, nameservers: tuple[HostPort, ...], timeout: float, tries: int = 3)
        .query(name: str, qtype: int, callback) -> None
            later, in the loop: callback(status: int, records: list, negative_ttl: int | None)
        .pending -> int                                     queries not answered yet
        .close() -> None
    QTYPES: dict[str, int]                                  "A" -> pycares.QUERY_TYPE_A, ...
    ChannelError                                            the channel cannot be made

DESCRIPTION
    c-ares does the DNS work in C: it keeps one UDP socket per name server
    and reuses it for many queries, matches each answer to its query by id
    and question, retries, falls back to TCP when an answer is truncated,
    and parses the answer. This module gives it its I/O on the loop: c-ares
    tells which sockets to watch (sock_state_cb), the loop calls back when
    one is readable or writable, and one timer, armed while queries are
    pending, lets c-ares time out and retry them (at most 0.25 s between
    checks).

    nameservers: the servers to ask, each host and port; empty means the
    system's /etc/resolv.conf, without c-ares's fallback to 127.0.0.1 when
    it names none (then every query fails). timeout is the time each try
    gets at first (c-ares doubles it for each round over the servers and
    adapts it to the servers' answer times), tries the number of tries per
    server.

    query() asks for (name, qtype) exactly as given (no search list, no
    HOSTALIASES) and calls callback(status, records, negative_ttl) once, in
    the loop's thread, also when c-ares refuses the query at once:
    - status 0 (ARES_SUCCESS): records is the answer section, a list of
      (name lower-cased without the final dot, type, ttl, data) with data
      pycares' record (ARecordData, MXRecordData, ...); records of types
      pycares does not read are left out;
    - ARES_ENOTFOUND (NXDOMAIN) or ARES_ENODATA (no record of the type):
      negative_ttl is min(SOA TTL, SOA MINIMUM) from the authority section
      (RFC 2308), None without an SOA;
    - any other pycares.errno code: a failure (timeout, SERVFAIL, REFUSED,
      connection refused, a name c-ares cannot send: ARES_EBADNAME).

    pycares is used as the binding it is (its cffi ffi and lib), beside its
    Channel, for three things its Python API lacks: the channel is made
    with ares_init_options with
    - c-ares's own query cache off: smtpgate.lookups.resolver keeps a
      bounded LRU cache; c-ares's has no size bound and keeps an empty
      (NODATA) answer for up to an hour whatever its SOA says (c-ares issue
      #1293);
    - the UDP socket to a server replaced after 100 queries, so the source
      port changes now and then (a spoofer must guess port and id);
    and queries are sent with ares_query_dnsrec and one C callback of this
    module's, which reads a negative answer's SOA (pycares drops it) and
    only the answer section.

    A channel belongs to the process and loop that made it: make it after
    fork, in the worker's loop. close() stops watching its sockets, drops
    the callbacks of queries still running (settle their callers first) and
    hands the channel to pycares, which destroys it in its own thread.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable

import pycares

from smtpgate.config import HostPort

__all__ = ["QTYPES", "ChannelError", "DnsChannel"]

_ffi, _lib = pycares._ffi, pycares._lib

QTYPES = {
    "A": pycares.QUERY_TYPE_A, "AAAA": pycares.QUERY_TYPE_AAAA, "CAA": pycares.QUERY_TYPE_CAA,
    "CNAME": pycares.QUERY_TYPE_CNAME, "MX": pycares.QUERY_TYPE_MX,
    "NAPTR": pycares.QUERY_TYPE_NAPTR, "NS": pycares.QUERY_TYPE_NS,
    "PTR": pycares.QUERY_TYPE_PTR, "SOA": pycares.QUERY_TYPE_SOA,
    "SRV": pycares.QUERY_TYPE_SRV, "TLSA": pycares.QUERY_TYPE_TLSA,
    "TXT": pycares.QUERY_TYPE_TXT,
}

_MAX_TIMER = 0.25  # re-check at least this often while queries run (c-ares' shortest try)
_UDP_MAX_QUERIES = 100
_OPT_UDP_MAX_QUERIES = 1 << 19  # ares.h; pycares does not export these two
_OPT_QUERY_CACHE = 1 << 21


class ChannelError(RuntimeError):
    pass


class DnsChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop, nameservers: tuple[HostPort, ...],
                 timeout: float, tries: int = 3) -> None:
        self._loop = loop
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._thread = threading.get_ident()  # c-ares may call back from pycares' own thread
        self.pending = 0
        # STAYOPEN: keep the sockets between bursts of queries (else each burst opens one)
        flags = (pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_NOALIASES
                 | pycares.ARES_FLAG_EDNS | pycares.ARES_FLAG_STAYOPEN)
        if not nameservers:
            flags |= pycares.ARES_FLAG_NO_DFLT_SVR
        try:
            self._channel = _Channel(flags, timeout, tries, self._sock_state)
            if nameservers:
                # c-ares' form: 192.0.2.1:53, [2001:db8::1]:53 (what HostPort prints)
                self._channel.servers = [str(ns) for ns in nameservers]
        except (pycares.AresError, ValueError, TypeError) as exc:
            raise ChannelError(f"cannot use DNS servers {_show(nameservers)}: {exc}") from None

    def query(self, name: str, qtype: int, callback) -> None:
        token = next(_tokens)
        _waiting[token] = (self, callback)
        self.pending += 1
        try:
            wire_name = name.encode("ascii") if name.isascii() else name.encode("idna")
        except UnicodeError:
            status = _lib.ARES_EBADNAME
        else:
            status = _lib.ares_query_dnsrec(
                self._channel._channel[0], wire_name, _lib.ARES_CLASS_IN, qtype, _on_answer,
                _ffi.cast("void *", token), _ffi.NULL)
        if status != _lib.ARES_SUCCESS and token in _waiting:
            # refused before it was sent (c-ares may also have called back already)
            self._loop.call_soon(_answered, token, status, _ffi.NULL)
        elif self._timer is None:
            self._arm()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._loop.is_closed():  # a loop left behind by a fork has nothing to undo
            for fd in self._readers:
                self._loop.remove_reader(fd)
            for fd in self._writers:
                self._loop.remove_writer(fd)
        self._readers.clear()
        self._writers.clear()
        self._channel.close()

    # c-ares' I/O on the loop

    def _sock_state(self, fd: int, readable: bool, writable: bool) -> None:
        if self._closed or threading.get_ident() != self._thread:
            return  # pycares' destroying thread closing the sockets: the loop let go of them
        if readable and fd not in self._readers:
            self._loop.add_reader(fd, self._readable, fd)
            self._readers.add(fd)
        elif not readable and fd in self._readers:
            self._loop.remove_reader(fd)
            self._readers.discard(fd)
        if writable and fd not in self._writers:
            self._loop.add_writer(fd, self._channel.process_write_fd, fd)
            self._writers.add(fd)
        elif not writable and fd in self._writers:
            self._loop.remove_writer(fd)
            self._writers.discard(fd)

    def _readable(self, fd: int) -> None:
        """pycares' process_read_fd() without its lock and context manager (a generator per
        answer read): the loop stops watching the sockets before close() hands the channel
        to pycares, so nothing else uses it meanwhile (query() calls c-ares likewise)."""
        _lib.ares_process_fd(self._channel._channel[0], fd, _SOCKET_BAD)

    def _arm(self) -> None:
        delay = self._channel.timeout(_MAX_TIMER)
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._channel.process_fd(pycares.ARES_SOCKET_BAD, pycares.ARES_SOCKET_BAD)
        if self.pending:
            self._arm()


class _Channel(pycares.Channel):
    """pycares.Channel made with the two options its constructor lacks (see DESCRIPTION).

    Sets what pycares.Channel.__init__ sets for a channel with a sock_state_cb.
    """

    def __init__(self, flags: int, timeout: float, tries: int, sock_state_cb) -> None:
        ffi, lib = _ffi, _lib
        self._channel = None
        self._lock = threading.RLock()
        self._flags = flags
        options = ffi.new("struct ares_options *")
        options.flags = flags
        options.timeout = max(1, int(timeout * 1000))
        options.tries = tries
        options.udp_max_queries = _UDP_MAX_QUERIES
        options.qcache_max_ttl = 0
        self._sock_state_cb_handle = ffi.new_handle(sock_state_cb)
        options.sock_state_cb = lib._sock_state_cb
        options.sock_state_cb_data = self._sock_state_cb_handle
        mask = (lib.ARES_OPT_FLAGS | lib.ARES_OPT_TIMEOUTMS | lib.ARES_OPT_TRIES
                | lib.ARES_OPT_SOCK_STATE_CB | _OPT_UDP_MAX_QUERIES | _OPT_QUERY_CACHE)
        channel = ffi.new("ares_channel *")
        status = lib.ares_init_options(channel, options, mask)
        if status != lib.ARES_SUCCESS:
            raise pycares.AresError(status, pycares.errno.strerror(status))
        self._channel = channel
        pycares._shutdown_manager.start()


_A, _A_ADDR = _lib.ARES_REC_TYPE_A, _lib.ARES_RR_A_ADDR
_SOCKET_BAD = pycares.ARES_SOCKET_BAD


# c-ares calls one C function for every answer; the token in its argument says whose.
_waiting: dict[int, tuple[DnsChannel, Callable]] = {}
_tokens = itertools.count(1)


def _answered(token: int, status: int, dnsrec) -> None:
    entry = _waiting.pop(token, None)
    if entry is None:
        return
    channel, callback = entry
    if channel._closed or threading.get_ident() != channel._thread:
        return  # cancelled by pycares destroying the channel: the caller moved on
    channel.pending -= 1
    if status == _lib.ARES_SUCCESS:
        callback(status, _records(dnsrec), None)
    elif status in (_lib.ARES_ENOTFOUND, _lib.ARES_ENODATA):
        callback(status, [], _negative_ttl(dnsrec))
    else:
        callback(status, [], None)


@_ffi.callback("ares_callback_dnsrec")
def _on_answer(arg, status, _timeouts, dnsrec) -> None:
    _answered(int(_ffi.cast("uintptr_t", arg)), status, dnsrec)


def _records(dnsrec) -> list[tuple[str, int, int, object]]:
    """The answer section: (name lower-cased, type, ttl, pycares' record data) each."""
    records = []
    for i in range(_lib.ares_dns_record_rr_cnt(dnsrec, _lib.ARES_SECTION_ANSWER)):
        rr = _lib.ares_dns_record_rr_get_const(dnsrec, _lib.ARES_SECTION_ANSWER, i)
        rtype = _lib.ares_dns_rr_get_type(rr)
        if rtype == _A:
            # most answers (every DNSBL listing): read here, without the scratch buffer and
            # the C call pycares' own reading makes for the text form
            data = pycares.ARecordData(socket.inet_ntoa(
                _ffi.buffer(_lib.ares_dns_rr_get_addr(rr, _A_ADDR), 4)))
        else:
            try:
                data = pycares.extract_record_data(rr, rtype)
            except ValueError:
                continue  # a type pycares does not read (RRSIG, DNAME...): not asked for
        name = _ffi.string(_lib.ares_dns_rr_get_name(rr)).decode("ascii", "replace")
        records.append((name.lower().rstrip("."), rtype, _lib.ares_dns_rr_get_ttl(rr), data))
    return records


def _negative_ttl(dnsrec) -> int | None:
    """RFC 2308: a negative answer lives min(SOA TTL, SOA MINIMUM); None without an SOA."""
    if dnsrec == _ffi.NULL:
        return None
    for i in range(_lib.ares_dns_record_rr_cnt(dnsrec, _lib.ARES_SECTION_AUTHORITY)):
        rr = _lib.ares_dns_record_rr_get_const(dnsrec, _lib.ARES_SECTION_AUTHORITY, i)
        if _lib.ares_dns_rr_get_type(rr) == _lib.ARES_REC_TYPE_SOA:
            return min(_lib.ares_dns_rr_get_ttl(rr),
                       _lib.ares_dns_rr_get_u32(rr, _lib.ARES_RR_SOA_MINIMUM))
    return None


def _show(nameservers: tuple[HostPort, ...]) -> str:
    return " ".join(map(str, nameservers)) or "(the system's)"
