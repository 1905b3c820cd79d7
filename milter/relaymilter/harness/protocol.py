"""NAME
    relaymilter.harness.protocol - milter protocol constants (version 6)

DESCRIPTION
    The numbers and command bytes of sendmail's milter protocol as libmilter
    (mfdef.h, mfapi.h) defines them, shared by the codec, the client and the
    tests. Values only; nothing here can fail.
"""

from __future__ import annotations

PROTOCOL_VERSION = 6

# Commands (MTA -> milter), mfdef.h SMFIC_*.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Responses (milter -> MTA), mfdef.h SMFIR_*.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# Address families in SMFIC_CONNECT.
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"

# Protocol flags (SMFIP_*): steps the milter does not want, replies it will not send.
SMFIP_NOCONNECT = 0x00000001
SMFIP_NOHELO = 0x00000002
SMFIP_NOMAIL = 0x00000004
SMFIP_NORCPT = 0x00000008
SMFIP_NOBODY = 0x00000010
SMFIP_NOHDRS = 0x00000020
SMFIP_NOEOH = 0x00000040
SMFIP_NR_HDR = 0x00000080
SMFIP_NOUNKNOWN = 0x00000100
SMFIP_NODATA = 0x00000200
SMFIP_SKIP = 0x00000400
SMFIP_RCPT_REJ = 0x00000800
SMFIP_NR_CONN = 0x00001000
SMFIP_NR_HELO = 0x00002000
SMFIP_NR_MAIL = 0x00004000
SMFIP_NR_RCPT = 0x00008000
SMFIP_NR_DATA = 0x00010000
SMFIP_NR_UNKN = 0x00020000
SMFIP_NR_EOH = 0x00040000
SMFIP_NR_BODY = 0x00080000
SMFIP_HDR_LEADSPC = 0x00100000
# Everything above: what a version 6 MTA offers (mfdef.h SMFI_CURR_PROT).
SMFI_CURR_PROT = 0x001FFFFF

# Actions (SMFIF_*) the milter may request.
SMFIF_ADDHDRS = 0x001
SMFIF_CHGBODY = 0x002
SMFIF_ADDRCPT = 0x004
SMFIF_DELRCPT = 0x008
SMFIF_CHGHDRS = 0x010
SMFIF_QUARANTINE = 0x020
SMFIF_CHGFROM = 0x040
SMFIF_ADDRCPT_PAR = 0x080
SMFIF_SETSYMLIST = 0x100
SMFI_CURR_ACTS = 0x1FF

# Macro stages (SMFIM_*) as used in SMFIR_SETSYMLIST, and the command each belongs to.
SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVFROM, SMFIM_ENVRCPT, SMFIM_DATA, SMFIM_EOM, SMFIM_EOH = range(7)
MACRO_STAGE_COMMANDS = {
    SMFIM_CONNECT: SMFIC_CONNECT,
    SMFIM_HELO: SMFIC_HELO,
    SMFIM_ENVFROM: SMFIC_MAIL,
    SMFIM_ENVRCPT: SMFIC_RCPT,
    SMFIM_DATA: SMFIC_DATA,
    SMFIM_EOM: SMFIC_BODYEOB,
    SMFIM_EOH: SMFIC_EOH,
}

# libmilter's body chunk size; larger SMFIC_BODY packets are refused by milters.
MILTER_CHUNK_SIZE = 65535
# The largest data a milter may send (libmilter's 1M option, SMFIP_MDS_1M),
# plus the command byte. Anything longer is garbage, not a reply to wait for.
MAX_PACKET = 1024 * 1024

# Decisions that carry no data.
DECISIONS = {
    SMFIR_CONTINUE: "continue",
    SMFIR_ACCEPT: "accept",
    SMFIR_REJECT: "reject",
    SMFIR_TEMPFAIL: "tempfail",
    SMFIR_DISCARD: "discard",
    SMFIR_SKIP: "skip",
    SMFIR_SHUTDOWN: "shutdown",
    SMFIR_CONN_FAIL: "connfail",
}

RESPONSE_NAMES = {
    **DECISIONS,
    SMFIR_REPLYCODE: "replycode",
    SMFIR_PROGRESS: "progress",
    SMFIR_OPTNEG: "optneg",
    SMFIR_ADDRCPT: "addrcpt",
    SMFIR_ADDRCPT_PAR: "addrcpt_par",
    SMFIR_DELRCPT: "delrcpt",
    SMFIR_ADDHEADER: "addheader",
    SMFIR_INSHEADER: "insheader",
    SMFIR_CHGHEADER: "chgheader",
    SMFIR_REPLBODY: "replbody",
    SMFIR_CHGFROM: "chgfrom",
    SMFIR_QUARANTINE: "quarantine",
}
