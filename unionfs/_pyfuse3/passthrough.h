/*
passthrough.h: FUSE passthrough (the kernel reads and writes an open file's
backing file itself) for Operations.passthrough.

libfuse 3.16 and later have it (FUSE_CAP_PASSTHROUGH, fuse_file_info.backing_id);
there this file only fills those in. An older libfuse (3.14 is Debian 12's) can
neither ask for it in the INIT reply nor send a backing id in an OPEN reply, but
it lets the filesystem do the session's reads and writes (fuse_session_custom_io,
3.14 and later); the hooks below see the kernel's INIT request and amend two
replies on their way out:

- INIT: FUSE_PASSTHROUGH (flags2 bit 5, flag bit 37) and max_stack_depth, when
  the kernel offered it (protocol 7.40 or later) and writeback caching is off
  (the kernel refuses the two together);
- OPEN and CREATE: FOPEN_PASSTHROUGH and the backing id the filesystem gave the
  FileInfo (upt_reply_backing, set just before the reply is sent, in the same
  thread).

Without splice callbacks libfuse uses neither splice read nor splice write on a
custom-io session, so every request and reply passes through these two hooks.
The struct layouts are the kernel's include/uapi/linux/fuse.h (7.40 or later),
spelled out here because the headers of an older system do not have them.

This file is part of unionfs's patches to pyfuse3 (patches/pyfuse3), under
pyfuse3's licence, the GNU LGPL.
*/

#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#define UPT_OP_INIT 26
#define UPT_INIT_EXT (1u << 30)
#define UPT_WRITEBACK_CACHE (1u << 16)
#define UPT_PASSTHROUGH2 (1u << (37 - 32))
#define UPT_FOPEN_PASSTHROUGH (1u << 7)
/* what the kernel accepts beside FOPEN_PASSTHROUGH (FOPEN_PASSTHROUGH_MASK):
   DIRECT_IO, NOFLUSH and PARALLEL_DIRECT_WRITES; KEEP_CACHE makes the open fail */
#define UPT_FOPEN_ALLOWED ((1u << 0) | (1u << 5) | (1u << 6))
#define UPT_ENTRY_OUT_SIZE 128

struct upt_in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct upt_init_in {
    uint32_t major, minor, max_readahead, flags, flags2;
};

struct upt_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct upt_init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2;
    uint32_t max_stack_depth;
};

struct upt_open_out {
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};

struct upt_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};

#define UPT_IOC_BACKING_OPEN _IOW(229, 1, struct upt_backing_map)
#define UPT_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

/* the filesystem wants passthrough, with this max_stack_depth (1: backing files on
   filesystems that are not stacked themselves; the mount may be a layer of one) */
static int upt_want = 0;
static uint32_t upt_stack_depth = 1;
/* the kernel offered it in INIT / the INIT reply asked for it */
static int upt_offered = 0;
static int upt_enabled = 0;
static int upt_init_seen = 0;
static uint64_t upt_init_unique = 0;
/* the backing id for the OPEN or CREATE reply this thread is sending (0: none) */
static __thread int32_t upt_reply_backing = 0;

static ssize_t upt_read(int fd, void *buf, size_t len, void *userdata)
{
    ssize_t res = read(fd, buf, len);
    (void) userdata;
    if (!upt_init_seen &&
        res >= (ssize_t) (sizeof(struct upt_in_header) + sizeof(struct upt_init_in))) {
        const struct upt_in_header *in = buf;
        if (in->opcode == UPT_OP_INIT) {
            const struct upt_init_in *arg = (const void *) (in + 1);
            upt_init_seen = 1;
            upt_init_unique = in->unique;
            upt_offered = arg->major == 7 && arg->minor >= 40 &&
                (arg->flags & UPT_INIT_EXT) && (arg->flags2 & UPT_PASSTHROUGH2);
        }
    }
    return res;
}

static void upt_amend_init(struct iovec *arg)
{
    struct upt_init_out *out = arg->iov_base;
    if (arg->iov_len < sizeof(*out) || !(out->flags & UPT_INIT_EXT) ||
        (out->flags & UPT_WRITEBACK_CACHE))
        return;
    out->flags2 |= UPT_PASSTHROUGH2;
    out->max_stack_depth = upt_stack_depth;
    upt_enabled = 1;
}

static void upt_amend_open(struct iovec *arg)
{
    struct upt_open_out *out;
    if (arg->iov_len != sizeof(*out) &&
        arg->iov_len != UPT_ENTRY_OUT_SIZE + sizeof(*out))
        return;
    out = (void *) ((char *) arg->iov_base + arg->iov_len - sizeof(*out));
    out->open_flags = (out->open_flags & UPT_FOPEN_ALLOWED) | UPT_FOPEN_PASSTHROUGH;
    out->backing_id = upt_reply_backing;
}

static ssize_t upt_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void) userdata;
    if (count == 2 && iov[0].iov_len == sizeof(struct upt_out_header)) {
        const struct upt_out_header *out = iov[0].iov_base;
        /* notifications have unique 0 and are sent from another thread */
        if (out->error == 0 && out->unique != 0) {
            if (upt_init_seen && out->unique == upt_init_unique && !upt_enabled) {
                if (upt_want && upt_offered)
                    upt_amend_init(&iov[1]);
            } else if (upt_reply_backing > 0) {
                upt_amend_open(&iov[1]);
            }
        }
    }
    return writev(fd, iov, count);
}

static int upt_backing_open(int session_fd, int fd)
{
    struct upt_backing_map map = { fd, 0, 0 };
    int res = ioctl(session_fd, UPT_IOC_BACKING_OPEN, &map);
    return res < 0 ? -errno : res;
}

static int upt_backing_close(int session_fd, int backing_id)
{
    uint32_t id = (uint32_t) backing_id;
    return ioctl(session_fd, UPT_IOC_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}

#if FUSE_VERSION >= FUSE_MAKE_VERSION(3, 16)
/* libfuse's own passthrough (not built on this project's CI, which has 3.14): no
   custom io; its INIT and OPEN replies carry what the hooks above add by hand */
#define UPT_NATIVE 1
static int upt_install(struct fuse_session *se, int fd)
{
    (void) se; (void) fd;
    return 0;
}

static void upt_conn_init(struct fuse_conn_info *conn)
{
    upt_offered = (conn->capable & FUSE_CAP_PASSTHROUGH) != 0;
    if (upt_want && upt_offered) {
        conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
        conn->want |= FUSE_CAP_PASSTHROUGH;
        conn->max_backing_stack_depth = upt_stack_depth - 1;
        upt_enabled = 1;
    }
}

static void upt_set_backing(struct fuse_file_info *fi, int32_t backing_id)
{
    fi->backing_id = backing_id;
}
#elif FUSE_VERSION >= FUSE_MAKE_VERSION(3, 14)
#define UPT_NATIVE 0
static int upt_install(struct fuse_session *se, int fd)
{
    static const struct fuse_custom_io io = { upt_writev, upt_read, NULL, NULL };
    return fuse_session_custom_io(se, &io, fd);
}

/* libfuse has read the INIT request (upt_read saw the kernel's offer) before it
   calls init; the reply is amended in upt_writev */
static void upt_conn_init(struct fuse_conn_info *conn)
{
    if (upt_want && upt_offered)
        conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void upt_set_backing(struct fuse_file_info *fi, int32_t backing_id)
{
    (void) fi;
    upt_reply_backing = backing_id;
}

#else
/* no custom io before libfuse 3.14 (with its splice members): no passthrough */
#define UPT_NATIVE 0
static int upt_install(struct fuse_session *se, int fd)
{
    (void) se; (void) fd;
    (void) upt_writev; (void) upt_read;
    upt_want = 0;
    return 0;
}

static void upt_conn_init(struct fuse_conn_info *conn)
{
    (void) conn;
}

static void upt_set_backing(struct fuse_file_info *fi, int32_t backing_id)
{
    (void) fi; (void) backing_id;
}
#endif

/* after the OPEN or CREATE reply is sent */
static void upt_reply_done(void)
{
    upt_reply_backing = 0;
}
