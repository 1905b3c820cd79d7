/*
 * ref_milter - the C ceiling for benchmarks/milter_ceiling.py: libmilter + libdb, the same policy.
 *
 *     ref_milter SOCKET RELAYERS.DB LOCAL_DOMAIN
 *
 * RCPT TO: a recipient at LOCAL_DOMAIN continues; any other continues when the
 * client's address is a key of RELAYERS.DB (Berkeley DB hash, makemap style:
 * no trailing NUL), else 550 5.7.1 Relaying denied. relayers.db is read at
 * most once per transaction, as relaymilter does, under flock(LOCK_SH), and
 * reopened when its inode, size or mtime changed (writers update it in
 * place). Negotiates the steps relaymilter negotiates: CONNECT (no reply),
 * MAIL, RCPT, DATA; everything else declined. Built by the benchmark with
 *     cc -O2 -o ref_milter ref_milter.c -lmilter -ldb -lpthread
 * Runs until killed. Not a product: no logging, no spammers, no resolution
 * of routing tricks.
 */

#include <arpa/inet.h>
#include <db.h>
#include <fcntl.h>
#include <libmilter/mfapi.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static const char *db_path;
static const char *local_domain;
static DB *dbp;
static int db_fd = -1;
static struct stat db_st;
static pthread_mutex_t db_lock = PTHREAD_MUTEX_INITIALIZER;

struct conn {
	char addr[INET6_ADDRSTRLEN];
	int listed;			/* -1: not asked in this transaction */
};

static int same_file(const struct stat *a, const struct stat *b)
{
	return a->st_ino == b->st_ino && a->st_dev == b->st_dev && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* 1 listed, 0 not (or no map), -1 unreadable */
static int lookup(const char *addr)
{
	struct stat st;
	DBT key, data;
	int r;

	pthread_mutex_lock(&db_lock);
	if (stat(db_path, &st) != 0) {
		pthread_mutex_unlock(&db_lock);
		return 0;
	}
	if (dbp == NULL || !same_file(&st, &db_st)) {
		if (dbp != NULL)
			dbp->close(dbp, 0);
		if (db_fd >= 0)
			close(db_fd);
		dbp = NULL;
		db_fd = open(db_path, O_RDONLY);
		if (db_fd < 0 || db_create(&dbp, NULL, 0) != 0 ||
		    dbp->open(dbp, NULL, db_path, NULL, DB_HASH, DB_RDONLY, 0) != 0) {
			if (dbp != NULL)
				dbp->close(dbp, 0);
			dbp = NULL;
			pthread_mutex_unlock(&db_lock);
			return -1;
		}
		db_st = st;
	}
	memset(&key, 0, sizeof key);
	memset(&data, 0, sizeof data);
	key.data = (void *)addr;
	key.size = strlen(addr);
	flock(db_fd, LOCK_SH);
	r = dbp->get(dbp, NULL, &key, &data, 0);
	flock(db_fd, LOCK_UN);
	pthread_mutex_unlock(&db_lock);
	return r == 0 ? 1 : (r == DB_NOTFOUND ? 0 : -1);
}

static sfsistat on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
			     unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	*pf0 = 0;
	*pf1 = f1 & ~(SMFIP_NOCONNECT | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NODATA |
		      SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA);
	*pf2 = 0;
	*pf3 = 0;
	return SMFIS_CONTINUE;
}

static sfsistat on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *sa)
{
	struct conn *c = smfi_getpriv(ctx);

	if (c == NULL) {
		c = calloc(1, sizeof *c);
		if (c == NULL)
			return SMFIS_TEMPFAIL;
		smfi_setpriv(ctx, c);
	}
	c->addr[0] = '\0';
	c->listed = -1;
	if (sa != NULL && sa->sa_family == AF_INET)
		inet_ntop(AF_INET, &((struct sockaddr_in *)sa)->sin_addr, c->addr, sizeof c->addr);
	else if (sa != NULL && sa->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((struct sockaddr_in6 *)sa)->sin6_addr, c->addr, sizeof c->addr);
	return SMFIS_NOREPLY;
}

static sfsistat on_envfrom(SMFICTX *ctx, char **argv)
{
	struct conn *c = smfi_getpriv(ctx);

	if (c != NULL)
		c->listed = -1;
	return SMFIS_CONTINUE;
}

static sfsistat on_envrcpt(SMFICTX *ctx, char **argv)
{
	struct conn *c = smfi_getpriv(ctx);
	char *at, *end;
	size_t n;

	if (c == NULL)
		return SMFIS_TEMPFAIL;
	at = strrchr(argv[0], '@');
	if (at != NULL) {
		at++;
		end = strchr(at, '>');
		n = end != NULL ? (size_t)(end - at) : strlen(at);
		if (n > 0 && at[n - 1] == '.')
			n--;
		if (n == strlen(local_domain) && strncasecmp(at, local_domain, n) == 0)
			return SMFIS_CONTINUE;
	}
	if (c->listed < 0)
		c->listed = c->addr[0] ? lookup(c->addr) : 0;
	if (c->listed == 1)
		return SMFIS_CONTINUE;
	if (c->listed < 0) {
		smfi_setreply(ctx, "451", "4.3.0", "Relay check temporarily unavailable, try again later");
		return SMFIS_TEMPFAIL;
	}
	smfi_setreply(ctx, "550", "5.7.1", "Relaying denied");
	return SMFIS_REJECT;
}

static sfsistat on_close(SMFICTX *ctx)
{
	struct conn *c = smfi_getpriv(ctx);

	free(c);
	smfi_setpriv(ctx, NULL);
	return SMFIS_CONTINUE;
}

int main(int argc, char **argv)
{
	struct smfiDesc desc;

	if (argc != 4) {
		fprintf(stderr, "usage: ref_milter SOCKET RELAYERS.DB LOCAL_DOMAIN\n");
		return 2;
	}
	db_path = argv[2];
	local_domain = argv[3];
	memset(&desc, 0, sizeof desc);
	desc.xxfi_name = "ref_milter";
	desc.xxfi_version = SMFI_VERSION;
	desc.xxfi_connect = on_connect;
	desc.xxfi_envfrom = on_envfrom;
	desc.xxfi_envrcpt = on_envrcpt;
	desc.xxfi_close = on_close;
	desc.xxfi_negotiate = on_negotiate;
	if (smfi_setconn(argv[1]) == MI_FAILURE || smfi_register(desc) == MI_FAILURE ||
	    smfi_opensocket(1) == MI_FAILURE) {
		fprintf(stderr, "ref_milter: cannot listen on %s\n", argv[1]);
		return 1;
	}
	smfi_settimeout(600);
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
