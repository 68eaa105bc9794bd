"""A validating walk of a sequential Huffman JPEG's entropy-coded data, without decoding pixels.

Garbage behind a valid header (random scan bytes without an ``0xFF``, a flipped byte in the
middle of a scan, a scan cut short) keeps the marker structure that
:func:`mixflow.data.jpeg_header.check_scan_markers` checks, and libjpeg (DALI's CPU decoder)
decodes it into wrong pixels with nothing but a "Corrupt JPEG data" warning. This walk finds
what those warnings report, at a fraction of a decode's cost (compiled by numba, one pass over
the scan data: Huffman symbols, magnitude bit counts and runs; no dequantisation, no IDCT):
0.3-0.6 of a PIL (libjpeg-turbo) decode for 500x375 to 640x427 photos, 0.1 for 32x32 digits
(``benchmarks/jpeg_entropy_cost.py``).

What is checked, for baseline (SOF0) and extended sequential (SOF1) Huffman frames, after
ITU-T T.81:

- the Huffman tables of each DHT segment (B.2.4.2), turned into decoding tables as in Annex C
  (code lengths and codes) and F.2.2.3 (MINCODE/MAXCODE/VALPTR); when a scan uses table 0 or 1
  of a class no DHT defined, the typical tables of K.3 stand in (libjpeg does the same, for
  Motion-JPEG frames that leave them out);
- the MCUs each scan must hold (A.2): one block per MCU in a single-component scan
  (``ceil(ceil(X*Hi/Hmax)/8) x ceil(ceil(Y*Vi/Vmax)/8)`` blocks), else ``ceil(X/(8*Hmax)) x
  ceil(Y/(8*Vmax))`` MCUs of ``Hi*Vi`` blocks per component, in scan order;
- restart intervals (DRI, B.2.4.4): ``Ri`` MCUs between ``RST0..RST7`` markers in sequence
  (F.1.2.3: each interval's data is byte-aligned);
- per block (F.2.2.1, F.2.2.2): a DC difference category, then AC run/size symbols until EOB or
  coefficient 63, with the 0x00 byte after each data ``0xFF`` removed (F.1.2.3, B.1.1.5).

It reports what libjpeg would warn about, and one thing T.81 forbids that libjpeg lets pass:

- a code that is in no Huffman table ("bad Huffman code");
- an AC run (or ZRL) reaching past coefficient 63 (F.1.2.2: a block has 63 AC coefficients;
  libjpeg pads its zig-zag table and so stays silent);
- fewer MCUs before the marker than the frame needs ("premature end of data segment"), or a
  restart marker out of sequence ("found marker ... instead of RSTn");
- whole bytes left over after the last MCU of an interval or scan, at least
  :data:`EXTRANEOUS_BYTES` ("extraneous bytes before marker"; an encoder leaves only padding
  bits, less than a byte);
- scan parameters other than sequential's Ss=0, Se=63, Ah=Al=0 ("invalid SOS parameters for
  sequential JPEG"), and a frame component that no scan codes.

What it cannot see: a change that keeps the code structure, such as flipped magnitude bits, or a
flipped byte after which the Huffman code resynchronises within a block or two (measured: about
60% of single-byte flips in these photos; the picture is then nearly intact, and libjpeg does not
warn either). Padding bits are not checked (F.1.2.3 asks for 1-bits; libjpeg ignores them).

Tables or headers libjpeg refuses outright (an undefined table, a component the frame lacks, a
table with more codes than its lengths allow or a DC category above 15, sampling factors outside
1..4, more than 10 components or more than 10 blocks per MCU) raise
:class:`~mixflow.data.jpeg_header.JpegError`: such a payload cannot be decoded at all.

Not checked (nothing reported; :func:`entropy_walk` says it did not walk): progressive (SOF2, SOF6, SOF10, SOF14), lossless
(SOF3, SOF7, SOF11, SOF15) and arithmetic-coded (SOF9..SOF15) frames, hierarchical (SOF5..7)
frames, and a frame without any scan (left to the decoder, which fails on it).
"""

from __future__ import annotations

import numba
import numpy as np

from mixflow.data.jpeg_header import JpegError

# Whole bytes left over before a marker, once an interval's (or scan's) MCUs are walked, from which
# the data is reported. An encoder leaves under a byte (padding bits); one stray byte is let pass.
EXTRANEOUS_BYTES = 2

# T.81 Annex K.3 (Tables K.3-K.6): the typical tables, DC 0, DC 1, AC 0, AC 1 (bits, then values).
_K3 = (
    ((0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0), "000102030405060708090a0b"),
    ((0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0), "000102030405060708090a0b"),
    ((0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125),
     "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a"
     "3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596"
     "9798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2"
     "f3f4f5f6f7f8f9fa"),
    ((0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119),
     "000102031104052131061241510761711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a26272829"
     "2a35363738393a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a9293949596"
     "9798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4"
     "f5f6f7f8f9fa"),
)
_STD_BITS = np.zeros((8, 17), np.int64)  # slot: class * 4 + table id; bits[l] = codes of length l
_STD_VALS = np.zeros((8, 256), np.uint8)
_STD_SET = np.zeros(8, np.bool_)
for _slot, (_bits, _vals) in zip((0, 1, 4, 5), _K3):
    _STD_BITS[_slot, 1:] = _bits
    _v = bytes.fromhex(_vals)
    assert len(_v) == sum(_bits)
    _STD_VALS[_slot, :len(_v)] = np.frombuffer(_v, np.uint8)
    _STD_SET[_slot] = True

# Outcomes of the walk: (status, a, b, c, d, at); the messages below say what a..d are.
OK, NOT_CHECKED = 0, 1
# libjpeg refuses these (ERREXIT): the payload cannot be decoded.
BAD_TABLE, DC_SYMBOL, NO_TABLE, NO_COMPONENT, BAD_FRAME, BAD_SCAN, MCU_TOO_BIG = 10, 11, 12, 13, 14, 15, 16
# libjpeg decodes these with a warning (WARNMS): suspect.
BAD_CODE, RUN_PAST_63, PREMATURE, EXTRANEOUS, RESTART_ORDER, NOT_SEQUENTIAL, NO_SCAN = 20, 21, 22, 23, 24, 25, 26
FATAL = frozenset(range(10, 20))

_LOOK = 9  # lookahead bits: codes up to this long are decoded by one table read


@numba.njit(cache=True, nogil=True, inline="always")
def _entry(sym, length, dc):  # pragma: no cover - compiled
    """A decoded symbol as the walk uses it: the bits it takes (code and magnitude bits, bits 0-4)
    and how far it moves the coefficient index (bits 5-11: 1 for DC, run + 1 for an AC coefficient,
    16 for ZRL, 64 for EOB: the block ends)."""
    if dc:
        return (length + sym) | (1 << 5)
    size = sym & 15
    if size != 0:
        return (length + size) | (((sym >> 4) + 1) << 5)
    if sym == 0xF0:
        return length | (16 << 5)
    return length | (64 << 5)  # EOB (a zero size with any other run ends the block, as in libjpeg)


@numba.njit(cache=True, nogil=True)
def _derive(bits, vals, slot, mincode, maxcode, valptr, look):  # pragma: no cover - compiled
    """Decoding tables of ``slot`` (T.81 C.1-C.2, F.2.2.3); False for a table with more codes than
    its lengths allow (libjpeg refuses one whose codes reach the all-1 code of a length)."""
    code = 0
    k = 0
    for i in range(1 << _LOOK):
        look[slot, i] = 0
    for length in range(1, 17):
        count = bits[slot, length]
        if count == 0:
            maxcode[slot, length] = -1
        else:
            valptr[slot, length] = k
            mincode[slot, length] = code
            for _ in range(count):
                if code >= (1 << length) - 1:  # libjpeg (and C.2) leave the all-1 code of each length unused
                    return False
                if length <= _LOOK:
                    span = 1 << (_LOOK - length)
                    first = code << (_LOOK - length)
                    entry = _entry(np.int64(vals[slot, k]), length, slot < 4)
                    for i in range(first, first + span):
                        look[slot, i] = entry
                code += 1
                k += 1
            maxcode[slot, length] = code - 1
        code <<= 1
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _slow_code(peek, slot, mincode, maxcode, valptr, vals):  # pragma: no cover - compiled
    """(symbol, length) of a code longer than the lookahead (T.81 F.2.2.3, Figure F.16): the
    first length whose MAXCODE the leading bits do not exceed; length 0 for a code no table has."""
    for length in range(_LOOK + 1, 17):
        code = peek >> (16 - length)
        if code <= maxcode[slot, length]:
            return np.int64(vals[slot, valptr[slot, length] + code - mincode[slot, length]]), length
    return 0, 0


@numba.njit(cache=True, nogil=True, inline="always")
def _refill(buf, pos, acc, nb, fake, hit, marker, mpos):  # pragma: no cover - compiled
    """Top up the bit buffer (left-aligned: its top ``nb`` bits are the next bits of the data) to
    over 56 bits, as libjpeg's ``jpeg_fill_bit_buffer``: a data ``0xFF`` is followed by a stuffed
    ``0x00`` (T.81 F.1.2.3), dropped; from a marker on, zero bits are fed in and counted in ``fake``
    (an MCU that takes them is one the data does not hold)."""
    n = buf.shape[0]
    while nb <= 56:
        c = np.uint64(0)
        if not hit:
            byte = buf[pos] if pos < n else np.uint8(0xFF)
            if byte != 0xFF:
                c = np.uint64(byte)
                pos += 1
            else:
                q = pos + 1
                while q < n and buf[q] == 0xFF:  # fill bytes before a marker
                    q += 1
                if q < n and buf[q] == 0:
                    c = np.uint64(0xFF)
                    pos = q + 1
                else:
                    hit = True
                    marker = np.int64(buf[q]) if q < n else 0
                    mpos = q - 1 if q < n else n
        if hit:
            fake += 8
        acc |= c << np.uint64(56 - nb)
        nb += 8
    return pos, acc, nb, fake, hit, marker, mpos


@numba.njit(cache=True, nogil=True)
def _walk_scan(buf, start, scan, dcs, acs, nblocks, n_mcus, restart, extra_limit,
               mincode, maxcode, valptr, vals, look):  # pragma: no cover - compiled
    """Walk one scan's entropy-coded data from ``buf[start]``: (status, a, b, c, d, at); for OK, ``at``
    is the marker that ends the scan. Each symbol is one read of ``look`` (see :func:`_entry`) and
    one shift of the bit buffer; codes longer than the lookahead take :func:`_slow_code`."""
    n = buf.shape[0]
    pos = start
    left = n_mcus
    done = 0  # MCUs of the scan walked
    expected = 0  # the next restart marker: RST0..RST7, in turn
    top = np.uint64(64 - _LOOK)
    while True:
        acc = np.uint64(0)
        nb = 0
        fake = 0
        hit = False
        marker = 0
        mpos = n
        want = left if restart == 0 or restart > left else restart
        for m in range(want):
            for b in range(nblocks):
                # DC (F.2.2.1): the difference's category, then that many bits
                if nb < 32:  # a code (<= 16 bits) and its magnitude bits (<= 15)
                    pos, acc, nb, fake, hit, marker, mpos = _refill(buf, pos, acc, nb, fake, hit, marker, mpos)
                slot = dcs[b]
                entry = look[slot, acc >> top]
                if entry == 0:  # a code longer than the lookahead, or none
                    sym, size = _slow_code(np.int64(acc >> np.uint64(48)), slot, mincode, maxcode, valptr, vals)
                    if size == 0:
                        if nb - 16 < fake:
                            return PREMATURE, scan, done + m, n_mcus, marker, mpos
                        return BAD_CODE, scan, done + m, n_mcus, 0, pos - (nb - fake) // 8
                    entry = _entry(sym, size, True)
                used = entry & 31
                acc <<= np.uint64(used)
                nb -= used
                # AC (F.2.2.2): run/size symbols up to EOB or coefficient 63
                slot = acs[b]
                k = 1
                while k < 64:
                    if nb < 32:
                        pos, acc, nb, fake, hit, marker, mpos = _refill(buf, pos, acc, nb, fake, hit, marker, mpos)
                    entry = look[slot, acc >> top]
                    if entry == 0:
                        sym, size = _slow_code(np.int64(acc >> np.uint64(48)), slot, mincode, maxcode, valptr, vals)
                        if size == 0:
                            if nb - 16 < fake:
                                return PREMATURE, scan, done + m, n_mcus, marker, mpos
                            return BAD_CODE, scan, done + m, n_mcus, 0, pos - (nb - fake) // 8
                        entry = _entry(sym, size, False)
                    used = entry & 31
                    acc <<= np.uint64(used)
                    nb -= used
                    step = entry >> 5
                    if step == 64:  # EOB
                        break
                    k += step
                    if k > 64:  # a run (or ZRL) past coefficient 63
                        if nb < fake:
                            return PREMATURE, scan, done + m, n_mcus, marker, mpos
                        return RUN_PAST_63, scan, done + m, n_mcus, k - 1, pos - (nb - fake) // 8
            if nb < fake:  # the MCU took bits past the marker
                return PREMATURE, scan, done + m, n_mcus, marker, mpos
        # Whole bytes left before the marker: in the buffer, then up to it (libjpeg's discarded bytes).
        extra = (nb - fake) // 8
        while not hit and pos < n:
            if buf[pos] != 0xFF:
                extra += 1
                pos += 1
                continue
            q = pos + 1
            while q < n and buf[q] == 0xFF:
                q += 1
            if q < n and buf[q] == 0:
                extra += 1
                pos = q + 1
                continue
            hit = True
            marker = np.int64(buf[q]) if q < n else 0
            mpos = q - 1 if q < n else n
        if extra >= extra_limit:
            return EXTRANEOUS, scan, extra, 0, marker, mpos
        left -= want
        done += want
        if left == 0:
            return OK, scan, done, n_mcus, marker, mpos
        if marker < 0xD0 or marker > 0xD7:
            return PREMATURE, scan, done, n_mcus, marker, mpos
        if marker != 0xD0 + expected:
            return RESTART_ORDER, scan, marker, 0xD0 + expected, 0, mpos
        expected = (expected + 1) & 7
        pos = mpos + 2


@numba.njit(cache=True, nogil=True)
def _walk(buf, std_bits, std_vals, std_set, extra_limit):  # pragma: no cover - compiled
    """Walk the segments of a JPEG from after SOI, and each sequential Huffman scan's data:
    (status, a, b, c, d, at)."""
    n = buf.shape[0]
    bits = std_bits.copy()
    vals = std_vals.copy()
    defined = std_set.copy()
    mincode = np.zeros((8, 17), np.int64)
    maxcode = np.full((8, 17), -1, np.int64)
    valptr = np.zeros((8, 17), np.int64)
    look = np.zeros((8, 1 << _LOOK), np.int32)
    comp_id = np.zeros(256, np.int64)
    h = np.zeros(256, np.int64)
    v = np.zeros(256, np.int64)
    scanned = np.zeros(256, np.bool_)
    dcs = np.zeros(10, np.int64)
    acs = np.zeros(10, np.int64)
    nf = 0
    width = 0
    height = 0
    hmax = 1
    vmax = 1
    restart = 0
    scans = 0
    pos = 2
    while True:
        while pos < n and buf[pos] != 0xFF:  # only after a scan that ended in RSTn (libjpeg skips them)
            pos += 1
        while pos + 1 < n and buf[pos + 1] == 0xFF:
            pos += 1
        if pos + 1 >= n:
            break
        marker = np.int64(buf[pos + 1])
        if marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7 or marker == 0x00:
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + ((np.int64(buf[pos + 2]) << 8) | buf[pos + 3])
        if end > n:
            break  # the header check reports such a segment
        if marker == 0xC4:  # DHT (B.2.4.2)
            q = pos + 4
            while q < end:
                tc = np.int64(buf[q])
                if (tc >> 4) > 1 or (tc & 15) > 3 or q + 17 > end:
                    return BAD_TABLE, tc, 0, 0, 0, q
                slot = (tc >> 4) * 4 + (tc & 15)
                total = 0
                for length in range(1, 17):
                    bits[slot, length] = buf[q + length]
                    total += buf[q + length]
                if total > 256 or q + 17 + total > end:
                    return BAD_TABLE, tc, total, 0, 0, q
                for i in range(total):
                    vals[slot, i] = buf[q + 17 + i]
                defined[slot] = True
                q += 17 + total
        elif marker == 0xDD and end - pos >= 6:  # DRI (B.2.4.4)
            restart = (np.int64(buf[pos + 4]) << 8) | buf[pos + 5]
        elif marker == 0xC0 or marker == 0xC1:  # SOF0, SOF1 (B.2.2)
            if end - pos < 10:
                return BAD_FRAME, 0, 0, 0, 0, pos
            height = (np.int64(buf[pos + 5]) << 8) | buf[pos + 6]
            width = (np.int64(buf[pos + 7]) << 8) | buf[pos + 8]
            nf = np.int64(buf[pos + 9])
            if nf == 0 or nf > 10 or pos + 10 + 3 * nf > end:  # libjpeg: at most 10 components
                return BAD_FRAME, nf, 0, 0, 0, pos
            hmax = 1
            vmax = 1
            for i in range(nf):
                comp_id[i] = buf[pos + 10 + 3 * i]
                h[i] = buf[pos + 11 + 3 * i] >> 4
                v[i] = buf[pos + 11 + 3 * i] & 15
                if h[i] < 1 or h[i] > 4 or v[i] < 1 or v[i] > 4:
                    return BAD_FRAME, comp_id[i], h[i], v[i], 1, pos
                hmax = max(hmax, h[i])
                vmax = max(vmax, v[i])
        elif 0xC2 <= marker <= 0xCF and marker != 0xC8 and marker != 0xCC:  # other processes: not walked
            return NOT_CHECKED, marker, 0, 0, 0, pos
        elif marker == 0xDA:  # SOS (B.2.3)
            if nf == 0:
                break  # no frame header: the header check reports it
            if end - pos < 6:
                return BAD_SCAN, 0, 0, 0, 0, pos
            ns = np.int64(buf[pos + 4])
            if ns < 1 or ns > 4 or end - pos != 2 + 6 + 2 * ns:
                return BAD_SCAN, ns, 0, 0, 0, pos
            at = pos + 5 + 2 * ns
            ss = np.int64(buf[at])
            se = np.int64(buf[at + 1])
            ah = np.int64(buf[at + 2]) >> 4
            al = np.int64(buf[at + 2]) & 15
            if ss != 0 or se != 63 or ah != 0 or al != 0:
                return NOT_SEQUENTIAL, ss, se, ah, al, pos
            nblocks = 0
            mcux = (width + 8 * hmax - 1) // (8 * hmax)
            mcuy = (height + 8 * vmax - 1) // (8 * vmax)
            n_mcus = mcux * mcuy
            for j in range(ns):
                cs = np.int64(buf[pos + 5 + 2 * j])
                td = np.int64(buf[pos + 6 + 2 * j] >> 4)
                ta = np.int64(buf[pos + 6 + 2 * j] & 15)
                c = -1
                for i in range(nf):
                    if comp_id[i] == cs:
                        c = i
                if c < 0:
                    return NO_COMPONENT, cs, 0, 0, 0, pos
                scanned[c] = True
                for cls in range(2):
                    t = td if cls == 0 else ta
                    if t > 3 or not defined[cls * 4 + t]:
                        return NO_TABLE, cls, t, 0, 0, pos
                    if not _derive(bits, vals, cls * 4 + t, mincode, maxcode, valptr, look):
                        return BAD_TABLE, cls * 16 + t, 0, 0, 1, pos
                if ns == 1:  # non-interleaved (A.2.2): one block per MCU
                    bw = ((width * h[c] + hmax - 1) // hmax + 7) // 8
                    bh = ((height * v[c] + vmax - 1) // vmax + 7) // 8
                    n_mcus = bw * bh
                    blocks = 1
                else:  # interleaved (A.2.3): Hi x Vi blocks of each component
                    blocks = h[c] * v[c]
                if nblocks + blocks > 10:  # B.2.3: at most 10 blocks in an MCU
                    return MCU_TOO_BIG, nblocks + blocks, 0, 0, 0, pos
                for _ in range(blocks):
                    dcs[nblocks] = td
                    acs[nblocks] = 4 + ta
                    nblocks += 1
                total = 0  # libjpeg: DC categories above 15 cannot be decoded
                for length in range(1, 17):
                    total += bits[td, length]
                for i in range(total):
                    if vals[td, i] > 15:
                        return DC_SYMBOL, td, np.int64(vals[td, i]), 0, 0, pos
            status, a, b, c2, d, at = _walk_scan(buf, end, scans, dcs, acs, nblocks, n_mcus, restart,
                                                 extra_limit, mincode, maxcode, valptr, vals, look)
            if status != OK:
                return status, a, b, c2, d, at
            scans += 1
            pos = at
            continue
        pos = end
    if scans > 0:
        for i in range(nf):
            if not scanned[i]:
                return NO_SCAN, comp_id[i], scans, 0, 0, pos
    return OK, scans, 0, 0, 0, pos


def _reason(status: int, a: int, b: int, c: int, d: int, at: int) -> str:
    mark = f"marker 0xFF 0x{d:02X} at byte {at}" if at >= 0 and d else f"the end of the data (byte {at})"
    if status == BAD_TABLE:
        if d:
            return (f"corrupt JPEG: bogus Huffman table definition: {('DC', 'AC')[a >> 4]} table {a & 15}, used "
                    f"by the scan at byte {at}, has more codes than its code lengths allow")
        return f"corrupt JPEG: bogus Huffman table definition (Tc/Th 0x{a:02X}) in a DHT segment, at byte {at}"
    if status == DC_SYMBOL:
        return f"corrupt JPEG: DC Huffman table {a} holds category {b} (above 15) at byte {at}"
    if status == NO_TABLE:
        return f"corrupt JPEG: the scan at byte {at} uses {('DC', 'AC')[a]} Huffman table {b}, which is not defined"
    if status == NO_COMPONENT:
        return f"corrupt JPEG: the scan at byte {at} selects component {a}, which the frame does not have"
    if status == BAD_FRAME:
        if d:
            return f"corrupt JPEG: component {a} has sampling factors {b}x{c} (not within 1..4) at byte {at}"
        return f"corrupt JPEG: bogus frame header ({a} components) at byte {at}"
    if status == BAD_SCAN:
        return f"corrupt JPEG: bogus scan header ({a} components) at byte {at}"
    if status == MCU_TOO_BIG:
        return f"corrupt JPEG: the scan at byte {at} has {a} blocks per MCU (at most 10)"
    where = f"scan {a + 1}"
    if status == BAD_CODE:
        return f"corrupt JPEG data: bad Huffman code in {where}, MCU {b} of {c}, near byte {at}"
    if status == RUN_PAST_63:
        return (f"corrupt JPEG data: an AC run reaches coefficient {d} (past 63) in {where}, MCU {b} of {c}, "
                f"near byte {at}")
    if status == PREMATURE:
        return (f"corrupt JPEG data: premature end of data segment: {where} holds {b} of the {c} MCUs "
                f"the frame needs before {mark}")
    if status == EXTRANEOUS:
        return f"corrupt JPEG data: {b} extraneous bytes before {mark} ({where})"
    if status == RESTART_ORDER:
        return f"corrupt JPEG data: found marker 0xFF 0x{b:02X} instead of RST{c - 0xD0} at byte {at} ({where})"
    if status == NOT_SEQUENTIAL:
        return f"invalid SOS parameters for sequential JPEG (Ss={a}, Se={b}, Ah={c}, Al={d}) at byte {at}"
    if status == NO_SCAN:
        return (f"incomplete JPEG: component {a} of the frame is in none of its {b} scan(s) (a sequential frame "
                "codes each component in a scan)")
    raise AssertionError(status)


def entropy_walk(data: bytes | memoryview | np.ndarray) -> tuple[bool, str | None]:
    """Walk the entropy-coded data of a JPEG that passed :func:`~mixflow.data.jpeg_header.jpeg_header`:
    ``(walked, problem)``. ``problem`` says what libjpeg would warn about (see the module
    docstring), ``None`` when the walk finds nothing; ``walked`` is False for a frame this does not
    walk (progressive, lossless, arithmetic-coded) or one without any scan. Raises
    :class:`JpegError` when the tables or scan headers make the data undecodable."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    status, a, b, c, d, at = _walk(buf, _STD_BITS, _STD_VALS, _STD_SET, EXTRANEOUS_BYTES)
    if status == OK:
        return a > 0, None
    if status == NOT_CHECKED:
        return False, None
    reason = _reason(int(status), int(a), int(b), int(c), int(d), int(at))
    if status in FATAL:
        raise JpegError(reason)
    return True, reason


def entropy_problem(data: bytes | memoryview | np.ndarray) -> str | None:
    """What libjpeg would warn about in the entropy-coded data of ``data``, or ``None``
    (see :func:`entropy_walk`)."""
    return entropy_walk(data)[1]
