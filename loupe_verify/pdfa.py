"""The PDF/A-3b rules that signing and incremental updates can break, checked on the final file.

Not a full validator (veraPDF is that): these are the ISO 19005-3 clauses a signature revision, a
metadata rewrite or an attachment bug touch, each problem naming its clause:

- 6.1.2: the header and the catalog's ``/Version`` stay at PDF 1.7 or lower, and no developer
  extension is based on PDF 2.0 (pyHanko declares ISO/TS 32002 for ECDSA keys);
- 6.1.3: the trailer has an ``/ID`` and no ``/Encrypt``;
- 6.2.3: an output intent ``/GTS_PDFA1`` with an embedded ICC profile;
- 6.6.2.1 and 6.6.4: XMP metadata in the catalog identifying PDF/A part 3, conformance B (or A/U);
- 6.6.2.3.1: every document information entry equals its XMP counterpart;
- 6.8: every embedded file has an ``/AFRelationship`` and is listed once in the catalog's ``/AF``;
- 6.2.11.4.1: every font used by a page, form XObject or annotation appearance is embedded.

:func:`is_tagged` checks the structure tree that makes the report accessible (ISO 32000-1 14.8).
"""

from __future__ import annotations

import datetime as dt
import io
import re
import xml.etree.ElementTree as ET
from typing import Any, cast

from pypdf import PdfReader
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, StreamObject

NS = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "dc": "http://purl.org/dc/elements/1.1/",
      "pdf": "http://ns.adobe.com/pdf/1.3/", "xmp": "http://ns.adobe.com/xap/1.0/",
      "pdfaid": "http://www.aiim.org/pdfa/ns/id/"}
# Document information key -> (XMP namespace, property, kind)
INFO_TO_XMP = {"/Title": ("dc", "title", "alt"), "/Author": ("dc", "creator", "seq"),
               "/Subject": ("dc", "description", "alt"), "/Keywords": ("pdf", "Keywords", "text"),
               "/Creator": ("xmp", "CreatorTool", "text"), "/Producer": ("pdf", "Producer", "text"),
               "/CreationDate": ("xmp", "CreateDate", "date"), "/ModDate": ("xmp", "ModifyDate", "date")}


def _resolve(obj: Any) -> Any:
    return obj.get_object() if isinstance(obj, IndirectObject) else obj


def _catalog(reader: PdfReader) -> DictionaryObject:
    # The trailer's /Root is the document catalog, a dictionary (ISO 32000-1 7.5.5); pypdf types it as
    # any PDF object.
    return cast(DictionaryObject, reader.trailer["/Root"])


def _version(text: object) -> tuple[int, int] | None:
    match = re.match(r"/?(\d+)\.(\d+)", str(text))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _pdf_date(value: str) -> dt.datetime | None:
    match = re.match(r"D:(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?([Z+\-])?(\d{2})?'?(\d{2})?", str(value))
    if not match:
        return None
    parts = [int(p) if p else d for p, d in zip(match.groups()[:6], (0, 1, 1, 0, 0, 0), strict=True)]
    sign, hh, mm = match.group(7), int(match.group(8) or 0), int(match.group(9) or 0)
    offset = dt.timedelta(hours=hh, minutes=mm) * (-1 if sign == "-" else 1)
    year, month, day, hour, minute, second = parts
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone(offset))


def _xmp_date(value: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _xmp_values(xml: bytes) -> dict[tuple[str, str], str]:
    """Simple and array-valued properties of an XMP packet: ``{(prefix, name): text}`` (first item)."""
    root = ET.fromstring(xml)
    values: dict[tuple[str, str], str] = {}
    uri_prefix = {uri: prefix for prefix, uri in NS.items()}
    for desc in root.iter(f"{{{NS['rdf']}}}Description"):
        for key, value in desc.attrib.items():
            uri, _, name = key[1:].partition("}")
            if uri in uri_prefix:
                values[(uri_prefix[uri], name)] = value
        for child in desc:
            uri, _, name = child.tag[1:].partition("}")
            if uri not in uri_prefix:
                continue
            item = child.find(".//rdf:li", NS)
            values[(uri_prefix[uri], name)] = (item.text if item is not None else child.text) or ""
    return values


def _fonts(resources: Any, seen: set[int]) -> list[tuple[str, DictionaryObject]]:
    """(name, font dict) for every font reachable from a resource dictionary, XObjects included."""
    resources = _resolve(resources)
    if not isinstance(resources, DictionaryObject) or id(resources) in seen:
        return []
    seen.add(id(resources))
    found = []
    for name, font in (_resolve(resources.get("/Font")) or {}).items():
        found.append((str(name), _resolve(font)))
    for xobject in (_resolve(resources.get("/XObject")) or {}).values():
        xobject = _resolve(xobject)
        if isinstance(xobject, StreamObject) and xobject.get("/Subtype") == "/Form":
            found += _fonts(xobject.get("/Resources"), seen)
    return found


def _font_embedded(font: DictionaryObject) -> bool:
    if font.get("/Subtype") == "/Type3":
        return True
    if font.get("/Subtype") == "/Type0":
        font = _resolve(_resolve(font.get("/DescendantFonts"))[0])
    descriptor = _resolve(font.get("/FontDescriptor"))
    return isinstance(descriptor, DictionaryObject) and any(
        k in descriptor for k in ("/FontFile", "/FontFile2", "/FontFile3"))


def pdfa3b_problems(pdf: bytes) -> list[str]:
    """The PDF/A-3b rules of the module docstring that ``pdf`` breaks; empty when none."""
    reader = PdfReader(io.BytesIO(pdf), strict=False)
    problems: list[str] = []
    root = _catalog(reader)

    header = _version(reader.pdf_header.replace("%PDF-", ""))
    if header is None or header > (1, 7):
        problems.append(f"ISO 19005-3 6.1.2: the file header is {reader.pdf_header}, PDF/A-3 is PDF 1.7")
    if "/Version" in root and (_version(root["/Version"]) or (9, 9)) > (1, 7):
        problems.append(f"ISO 19005-3 6.1.2: the catalog declares /Version {root['/Version']}, PDF/A-3 is PDF 1.7")
    for name, ext in (_resolve(root.get("/Extensions")) or {}).items():
        for entry in ext if isinstance(ext, ArrayObject) else [ext]:
            base = _version(_resolve(entry).get("/BaseVersion", "/1.7"))
            if base is not None and base > (1, 7):
                problems.append(f"ISO 19005-3 6.1.2: developer extension {name} is based on PDF "
                                f"{base[0]}.{base[1]}")

    if "/ID" not in reader.trailer:
        problems.append("ISO 19005-3 6.1.3: the trailer has no /ID")
    if "/Encrypt" in reader.trailer:
        problems.append("ISO 19005-3 6.1.3: the file is encrypted")

    intents = [_resolve(i) for i in (_resolve(root.get("/OutputIntents")) or [])]
    if not any(i.get("/S") == "/GTS_PDFA1" and isinstance(_resolve(i.get("/DestOutputProfile")), StreamObject)
               for i in intents):
        problems.append("ISO 19005-3 6.2.3: no /GTS_PDFA1 output intent with an embedded ICC profile")

    metadata = _resolve(root.get("/Metadata"))
    xmp: dict[tuple[str, str], str] = {}
    if not isinstance(metadata, StreamObject):
        problems.append("ISO 19005-3 6.6.2.1: the catalog has no XMP metadata stream")
    else:
        try:
            xmp = _xmp_values(metadata.get_data())
        except ET.ParseError as exc:
            problems.append(f"ISO 19005-3 6.6.2.1: the XMP metadata is not well-formed XML ({exc})")
    if metadata is not None and (xmp.get(("pdfaid", "part")) != "3"
                                 or xmp.get(("pdfaid", "conformance")) not in ("B", "A", "U")):
        problems.append("ISO 19005-3 6.6.4: the XMP metadata does not identify PDF/A-3 (pdfaid:part 3, "
                        f"conformance B), found part {xmp.get(('pdfaid', 'part'))!r} "
                        f"conformance {xmp.get(('pdfaid', 'conformance'))!r}")

    info = _resolve(reader.trailer.get("/Info")) or {}
    for key, (prefix, prop, kind) in INFO_TO_XMP.items():
        if key not in info:
            continue
        value, counterpart = str(info[key]), xmp.get((prefix, prop))
        if kind == "date":
            same = counterpart is not None and _pdf_date(value) == _xmp_date(counterpart)
        else:
            same = counterpart == value
        if not same:
            problems.append(f"ISO 19005-3 6.6.2.3.1: document information {key} ({value!r}) differs from XMP "
                            f"{prefix}:{prop} ({counterpart!r})")

    af = [ref.idnum for ref in (_resolve(root.get("/AF")) or []) if isinstance(ref, IndirectObject)]
    if len(af) != len(set(af)):
        problems.append("ISO 19005-3 6.8: the catalog's /AF lists an associated file more than once")
    names = _resolve(root.get("/Names")) or {}
    tree = _resolve(names.get("/EmbeddedFiles")) or {}
    entries = list(_resolve(tree.get("/Names")) or [])
    for kid in _resolve(tree.get("/Kids")) or []:
        entries += list(_resolve(_resolve(kid).get("/Names")) or [])
    for name, spec_ref in zip(entries[0::2], entries[1::2], strict=False):
        spec = _resolve(spec_ref)
        if "/AFRelationship" not in spec:
            problems.append(f"ISO 19005-3 6.8: embedded file {name} has no /AFRelationship")
        if isinstance(spec_ref, IndirectObject) and spec_ref.idnum not in af:
            problems.append(f"ISO 19005-3 6.8: embedded file {name} is not listed in the catalog's /AF")

    missing = set()
    for number, page in enumerate(reader.pages, 1):
        seen: set[int] = set()
        fonts = _fonts(page.get("/Resources"), seen)
        for annot in _resolve(page.get("/Annots")) or []:
            appearance = _resolve(_resolve(annot).get("/AP")) or {}
            for stream in appearance.values():
                stream = _resolve(stream)
                if isinstance(stream, StreamObject):
                    fonts += _fonts(stream.get("/Resources"), seen)
        for _, font in fonts:
            if not _font_embedded(font):
                missing.add((number, str(font.get("/BaseFont"))))
    for number, font_name in sorted(missing):
        problems.append(f"ISO 19005-3 6.2.11.4.1: font {font_name} on page {number} is not embedded")
    return problems


def is_tagged(pdf: bytes) -> bool:
    """Whether the file is tagged: ``/MarkInfo /Marked true`` and a structure tree (ISO 32000-1 14.8)."""
    root = _catalog(PdfReader(io.BytesIO(pdf), strict=False))
    mark = _resolve(root.get("/MarkInfo")) or {}
    return bool(mark.get("/Marked")) and isinstance(_resolve(root.get("/StructTreeRoot")), DictionaryObject)
