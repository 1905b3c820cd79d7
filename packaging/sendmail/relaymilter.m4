dnl relaymilter.m4 - hook relaymilter into sendmail (include from sendmail.mc)
dnl
dnl Use, in sendmail.mc, after the include of cf.m4 and before MAILER():
dnl   define(`RELAYMILTER_SOCKET', `inet:8894@127.0.0.1')dnl   (optional)
dnl   include(`/etc/mail/m4/relaymilter.m4')dnl
dnl then rebuild sendmail.cf (Debian: make -C /etc/mail) and restart sendmail.
dnl
dnl RELAYMILTER_SOCKET must name the socket relaymilter listens on (its
dnl `socket:' setting): inet:PORT@HOST, inet6:PORT@HOST or unix:/path.
dnl
dnl F=T: when relaymilter cannot be reached (not running, crashed, hung)
dnl sendmail answers 451 4.3.2 (try again later) instead of going on
dnl without it. Never drop F=T: with promiscuous_relay, a down milter
dnl without it would make this host an open relay. (F=R would refuse
dnl every connection with 554; F=T lets clients retry later.)
dnl
dnl Timeouts (T=): C: connecting to the milter; S: sending one
dnl command to it; R: waiting for one reply; E: overall, from the end
dnl of the message to the final reply. Each decision is a map lookup of
dnl a few milliseconds, so 10 s means something is wrong; a timeout is
dnl handled like a down milter (F=T: 451). Override with
dnl RELAYMILTER_TIMEOUTS, e.g. `C:10s;S:10s;R:10s;E:30s'.
dnl
dnl Macros: relaymilter reads {client_addr} at connect and RCPT (the
dnl address sendmail checks, as in its own relay rules), {auth_authen}
dnl and {auth_type} at MAIL (SMTP AUTH users may relay). Each is added to
dnl sendmail's macro list (or to your own, if you defined the list before
dnl this include) unless already there; nothing is replaced.
dnl
ifdef(`RELAYMILTER_SOCKET', , `define(`RELAYMILTER_SOCKET', `inet:8894@127.0.0.1')')dnl
ifdef(`RELAYMILTER_TIMEOUTS', , `define(`RELAYMILTER_TIMEOUTS', `C:10s;S:10s;R:10s;E:30s')')dnl
dnl _RELAYMILTER_ADD(list, macro): append macro to list unless it is in it.
dnl Quotes are [ ] meanwhile, so that the ` and ' in sendmail's stock lists
dnl are plain characters; translit drops them and blanks, and turns commas
dnl into ; (its result is rescanned, where a comma would split arguments).
changequote([,])dnl
define([_RELAYMILTER_ADD],
[ifelse(index([;]translit(defn([$1]), [,`' 	], [;])[;], [;$2;]), [-1],
[define([$1], ifelse(defn([$1]), [], [], [defn([$1])[, ]])[$2])])])dnl
_RELAYMILTER_ADD([confMILTER_MACROS_CONNECT], [{client_addr}])dnl
_RELAYMILTER_ADD([confMILTER_MACROS_ENVFROM], [{auth_authen}])dnl
_RELAYMILTER_ADD([confMILTER_MACROS_ENVFROM], [{auth_type}])dnl
_RELAYMILTER_ADD([confMILTER_MACROS_ENVRCPT], [{client_addr}])dnl
changequote(`,')dnl
dnl Included twice (say from a DOMAIN file and sendmail.mc): declare it once.
ifdef(`_RELAYMILTER_DECLARED_', ,
`define(`_RELAYMILTER_DECLARED_')dnl
INPUT_MAIL_FILTER(`relaymilter', `S='RELAYMILTER_SOCKET`, F=T, T='RELAYMILTER_TIMEOUTS)')dnl
