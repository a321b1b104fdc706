package console

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base32"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// Meta keys shared with the gateway, which writes the setup code's hash at
// start while no admin exists.
const (
	MetaSetupCode    = "console.setup_code_sha256"
	MetaAdminExists  = "console.admin_exists"
	metaRecoveryCode = "console.recovery_code"
)

// Cookie names. The __Host- prefix makes the browser insist on Secure,
// Path=/ and no Domain, so no other host can set or read them.
const (
	sessionCookie = "__Host-bastion_session"
	preCookie     = "__Host-bastion_pre" // double-submit token for the forms used before login
)

// Roles.
const (
	RoleAdmin  = "admin"
	RoleViewer = "viewer"
)

// Options configure the console handler.
type Options struct {
	Store   *store.Store // required
	Gateway Gateway      // required
	// Components are the optional parts; they can also be set later with
	// SetComponents, as the gateway builds them.
	Components Components
	Log        *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Throttle is the login rate limit (zero: DefaultThrottle).
	Throttle ThrottlePolicy
	// IdleTimeout and MaxAge end sessions (defaults 30 min and 12 h).
	IdleTimeout, MaxAge time.Duration
	// Metrics receives bastion_console_refusals_total{reason} (the
	// gateway's registry). Nil: counted, but not exported.
	Metrics prometheus.Registerer
	// LANPrefixes, if set, gives the prefixes of the box's LAN interfaces'
	// addresses now: a source in one is on the LAN, a global IPv6 one too
	// (the console's certificate names the box's address there). Asked
	// only for a source that is not loopback, private or link-local.
	LANPrefixes func() []netip.Prefix
}

// Components are the optional parts of the box the console shows. A nil
// one is shown as "not available in this build" (API: 501).
type Components struct {
	Pairing  Pairing
	Firmware Firmware
	Firewall Firewall
	Upstream Upstream
	Traffic  Traffic
	// RulesChanged, if set, is called after every change of the forwarding
	// rules, also when they cannot be read back; it reads them from the
	// store and decides what applies (the gateway holds the link while they
	// cannot be read). An error means the saved rules are not in force; the
	// user is told.
	RulesChanged func() error
	// OptOutsChanged, if set, gets the privacy opt-outs after every change.
	OptOutsChanged func(map[string]bool)
}

// SetComponents replaces the optional components; safe while serving.
func (h *Handler) SetComponents(c Components) { h.comp.Store(&c) }

func (h *Handler) c() *Components { return h.comp.Load() }

// consoleStore is the part of the store (*store.Store) whose failures the
// console answers or logs in a way of its own: the reads of sessions, API
// tokens and accounts that authenticate a request, the writes of login,
// recovery and password change, the deleting of ended sessions and of
// expired expected devices, the reading back of the privacy opt-outs.
// It is behind an interface so that a test can make one of these calls
// fail.
type consoleStore interface {
	Session(hash string) (store.Session, error)
	APIToken(hash string) (store.APIToken, error)
	Admin(name string) (store.AdminUser, error)
	PutSession(store.Session) error
	DeleteSession(hash string) error
	DeleteSessions(user string, expired func(store.Session) bool) error
	SetMeta(key string, v []byte) error
	SetPasswordEndAccess(user, hash string, at time.Time, keepSession string) (tokens int, err error)
	RecoverAdmin(user, hash string, at time.Time) (tokens int, err error)
	DeleteExpectedDevice(id string) error
	OptOuts() (map[string]bool, error)
}

// Handler serves the console's pages, its JSON API under /api/v1 and its
// static assets.
type Handler struct {
	o     Options
	log   *slog.Logger
	mux   *http.ServeMux
	hash  *hasher
	thr   *throttle
	cop   *http.CrossOriginProtection
	pages *pages
	comp  atomic.Pointer[Components]
	// refusals counts every refused request by reason (RefusalReasons).
	refusals *prometheus.CounterVec
	// refusalEvents spaces the audit events of failed logins and refused
	// codes (refusalAudit).
	refusalEvents *ratelog.Every
	// patterns are the routes registered, for the test that holds the
	// OpenAPI file to them.
	patterns []string
	// afterAuthRead, if set (tests), runs in authenticate between reading
	// the session or token and touching it.
	afterAuthRead func()
	// st is o.Store for the calls of consoleStore (tests put a wrapper
	// here that makes one of them fail).
	st consoleStore
	// optOutLock is held (a value in it) by the privacy opt-out change
	// under way, from saving it to handing the set to the gateway
	// (setOptOut). A channel rather than a sync.Mutex: a change waiting
	// for it gives up when its request ends.
	optOutLock chan struct{}

	mu      sync.Mutex
	flashes map[string]string
}

//go:embed static
var staticFS embed.FS

// NewHandler builds the console.
func NewHandler(o Options) (*Handler, error) {
	if o.Store == nil || o.Gateway == nil {
		return nil, errors.New("console: Store and Gateway are required")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Throttle == (ThrottlePolicy{}) {
		o.Throttle = DefaultThrottle
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = 30 * time.Minute
	}
	if o.MaxAge == 0 {
		o.MaxAge = 12 * time.Hour
	}
	pg, err := loadPages()
	if err != nil {
		return nil, err
	}
	hash := newHasher(2)
	if s, ok := o.Gateway.(Argon2Slots); ok {
		hash = &hasher{slots: s, own: make(chanSlots, 1)} // the box's bound, shared with device secret checks: one of them at most
	}
	h := &Handler{o: o, log: o.Log.With("component", "console"), mux: http.NewServeMux(), hash: hash,
		thr: newThrottle(o.Throttle, throttleKeys), cop: http.NewCrossOriginProtection(), pages: pg, flashes: map[string]string{},
		refusalEvents: ratelog.New(refusalAuditEvery), optOutLock: make(chan struct{}, 1)}
	h.st = o.Store
	h.SetComponents(o.Components)
	h.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "bastion_console_refusals_total",
		Help: "Console and API requests refused, by reason (not_lan, cross_origin, csrf, unauthenticated, forbidden_role, bad_login, throttled, bad_code, weak_password, invalid, too_large, not_found, conflict, other).",
	}, []string{"reason"})
	for _, r := range RefusalReasons { // every series exists from the start, at 0
		h.refusals.WithLabelValues(r)
	}
	if o.Metrics != nil {
		if err := o.Metrics.Register(h.refusals); err != nil {
			return nil, fmt.Errorf("console: register metrics: %w", err)
		}
	}
	sub, _ := fs.Sub(staticFS, "static")
	h.mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(sub)))
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	h.routes()
	return h, nil
}

// ServeHTTP answers only LAN and loopback sources.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.fromLAN(r.RemoteAddr) {
		h.refused(ReasonNotLAN)
		http.Error(w, "the console answers only on the local network", http.StatusForbidden)
		return
	}
	h.mux.ServeHTTP(w, r)
}

// lanSource reports whether addr is loopback, private (RFC 1918, ULA) or
// link-local: the console is for the people on the box's LAN.
func lanSource(addr string) bool {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return false
	}
	a := ap.Addr().Unmap()
	return a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast()
}

// fromLAN reports whether addr is lanSource or in one of the LAN
// interfaces' prefixes (Options.LANPrefixes).
func (h *Handler) fromLAN(addr string) bool {
	if lanSource(addr) {
		return true
	}
	if h.o.LANPrefixes == nil {
		return false
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return false
	}
	a := ap.Addr().Unmap()
	for _, p := range h.o.LANPrefixes() {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// NewRecoveryCode makes a one-time password recovery code valid for 15
// minutes and returns it. Only root on the box reaches it (bastionctl over
// the control socket, see RecoveryControlHandler); it is never reachable
// from the network, and there is no e-mail recovery.
func (h *Handler) NewRecoveryCode() (string, error) {
	return h.NewRecoveryCodeFor("bastionctl")
}

// NewRecoveryCodeFor is NewRecoveryCode on behalf of source (bastionctl,
// or the box's button held 10 s: gateway/pairing.go), which the audit log
// records.
func (h *Handler) NewRecoveryCodeFor(source string) (string, error) {
	code := newCode()
	sum := sha256.Sum256([]byte(code))
	v := hex.EncodeToString(sum[:]) + " " + strconv.FormatInt(h.o.Now().Add(15*time.Minute).Unix(), 10)
	if err := h.o.Store.SetMeta(metaRecoveryCode, []byte(v)); err != nil {
		return "", fmt.Errorf("store recovery code: %w", err)
	}
	h.audit(context.Background(), Actor{Name: source}, "console.recovery_code", "", "valid 15 minutes")
	return code, nil
}

// RecoveryControlHandler is the control-socket endpoint for
// `bastionctl console recover`: POST answers {"code": "...", "expires_in": "15m0s"}.
func (h *Handler) RecoveryControlHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		code, err := h.NewRecoveryCode()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"code": code, "expires_in": "15m0s"})
	})
}

// checkRecoveryCode reports whether code is the recovery code, unexpired,
// and if so spends it. Comparing and spending are one store transaction:
// of two requests with the code at once, one gets it.
func (h *Handler) checkRecoveryCode(code string) (bool, error) {
	now := h.o.Now().Unix()
	sum := sha256.Sum256([]byte(normCode(code)))
	got := hex.EncodeToString(sum[:])
	ok, err := h.o.Store.TakeMeta(metaRecoveryCode, func(v []byte) bool {
		f := strings.Fields(string(v))
		if len(f) != 2 {
			return false
		}
		exp, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || now > exp {
			return false
		}
		return subtle.ConstantTimeCompare([]byte(got), []byte(f[0])) == 1
	})
	if err != nil {
		return false, fmt.Errorf("check the recovery code: %w", err)
	}
	return ok, nil
}

var base32NoPad = base32.StdEncoding.WithPadding(base32.NoPadding)

func normCode(c string) string { return strings.ToUpper(strings.TrimSpace(c)) }

// newCode returns 80 random bits as XXXX-XXXX-XXXX-XXXX (base32).
func newCode() string {
	b := make([]byte, 10)
	rand.Read(b)
	s := base32NoPad.EncodeToString(b)
	return s[0:4] + "-" + s[4:8] + "-" + s[8:12] + "-" + s[12:16]
}

func randomToken() string {
	b := make([]byte, 32) // 256 bits
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func hashToken(t string) string {
	s := sha256.Sum256([]byte(t))
	return hex.EncodeToString(s[:])
}

// httpError is an error with the status and the message the user sees,
// and, for a refusal, its reason in bastion_console_refusals_total (empty:
// derived from the status).
type httpError struct {
	code   int
	msg    string
	reason string
	err    error // the cause, if any (storeFailed)
}

func (e *httpError) Error() string { return e.msg }
func (e *httpError) Unwrap() error { return e.err }

func errf(code int, format string, a ...any) error {
	return &httpError{code: code, msg: fmt.Sprintf(format, a...)}
}

// storeFailed is the answer when a store write failed, err, part way
// through an action: a 500 whose message, which the user sees, says what
// is done, what is not and what to do (format), where "internal error"
// would leave them guessing.
func storeFailed(err error, format string, a ...any) error {
	return &httpError{code: http.StatusInternalServerError, msg: fmt.Sprintf(format, a...), err: err}
}

// refuse is errf for a refusal whose reason the status alone does not say.
func refuse(reason string, code int, format string, a ...any) error {
	return &httpError{code: code, msg: fmt.Sprintf(format, a...), reason: reason}
}

// Refusal reasons: the values of the reason label of
// bastion_console_refusals_total. The set is fixed (never a label per user,
// address or path), so the series stay few.
const (
	ReasonNotLAN          = "not_lan"         // source address outside loopback/LAN
	ReasonCrossOrigin     = "cross_origin"    // Sec-Fetch-Site/Origin check of a state change
	ReasonCSRF            = "csrf"            // missing or wrong CSRF or pre-login form token
	ReasonUnauthenticated = "unauthenticated" // no, expired or unknown session or API token
	ReasonForbiddenRole   = "forbidden_role"  // a viewer asking for an admin action
	ReasonBadLogin        = "bad_login"       // wrong user name or password
	ReasonThrottled       = "throttled"       // login, setup or recovery locked out
	ReasonBadCode         = "bad_code"        // wrong setup or recovery code
	ReasonWeakPassword    = "weak_password"   // a new password the strength check refuses
	ReasonInvalid         = "invalid"         // malformed or invalid input
	ReasonTooLarge        = "too_large"       // request body over 64 KiB
	ReasonNotFound        = "not_found"       // no such device, rule, account ...
	ReasonConflict        = "conflict"        // name taken, already exists, last admin ...
	ReasonOther           = "other"           // any other 4xx
)

// RefusalReasons lists every reason, in the order of the list above.
var RefusalReasons = []string{ReasonNotLAN, ReasonCrossOrigin, ReasonCSRF, ReasonUnauthenticated, ReasonForbiddenRole,
	ReasonBadLogin, ReasonThrottled, ReasonBadCode, ReasonWeakPassword, ReasonInvalid, ReasonTooLarge, ReasonNotFound,
	ReasonConflict, ReasonOther}

// refusalReason classifies an answered error with status code; ok is false
// when it is not a refusal (a 5xx is the gateway's fault, not the client's).
func refusalReason(err error, code int) (string, bool) {
	if code < 400 || code >= 500 {
		return "", false
	}
	var he *httpError
	if errors.As(err, &he) && he.reason != "" {
		return he.reason, true
	}
	switch code {
	case http.StatusBadRequest, http.StatusUnsupportedMediaType, http.StatusUnprocessableEntity:
		return ReasonInvalid, true
	case http.StatusUnauthorized:
		return ReasonUnauthenticated, true
	case http.StatusNotFound:
		return ReasonNotFound, true
	case http.StatusConflict:
		return ReasonConflict, true
	case http.StatusRequestEntityTooLarge:
		return ReasonTooLarge, true
	case http.StatusTooManyRequests:
		return ReasonThrottled, true
	}
	return ReasonOther, true
}

// refused counts one refusal.
func (h *Handler) refused(reason string) { h.refusals.WithLabelValues(reason).Inc() }

func statusOf(err error) (int, string) {
	var he *httpError
	if errors.As(err, &he) {
		return he.code, he.msg
	}
	var le *lockedError
	if errors.As(err, &le) {
		return http.StatusTooManyRequests, le.Error()
	}
	var br BadRequestError
	if errors.As(err, &br) && br.BadRequest() {
		return http.StatusBadRequest, err.Error()
	}
	if errors.Is(err, store.ErrNotFound) {
		return http.StatusNotFound, err.Error()
	}
	if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNameTaken) || errors.Is(err, store.ErrLastAdmin) {
		return http.StatusConflict, err.Error()
	}
	return http.StatusInternalServerError, "internal error (see the gateway log)"
}

func (h *Handler) audit(ctx context.Context, who Actor, action, target, detail string) {
	if _, err := h.o.Store.Audit(store.Event{Time: h.o.Now(), Actor: who.Name, Remote: who.Remote, Action: action, Target: target, Detail: detail}); err != nil {
		h.log.ErrorContext(ctx, "audit log write failed", "action", action, "err", err)
	}
}

func remoteIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// principal is who a request acts as.
type principal struct {
	user    string
	role    string
	session *store.Session // nil when authenticated by API token
	token   string         // API token id
	remote  string
}

func (p *principal) actor() Actor { return Actor{Name: p.user, Remote: p.remote} }

// authenticate finds the principal from an API token or a session cookie.
// It returns nil (no error) when the request carries neither, or a session
// that does not authenticate. Only a session or token that is not stored,
// or whose account is not, is refused as such; a store that fails to read
// them is answered 503 and ends nothing, so that a passing store error
// does not log the administrator out.
func (h *Handler) authenticate(r *http.Request) (*principal, error) {
	now := h.o.Now()
	if az := r.Header.Get("Authorization"); az != "" {
		tok, ok := parseBearer(az)
		if !ok {
			return nil, errf(http.StatusUnauthorized, "Authorization header: use Bearer <token>")
		}
		t, err := h.st.APIToken(hashToken(tok))
		if errors.Is(err, store.ErrNotFound) {
			return nil, errf(http.StatusUnauthorized, "unknown API token")
		} else if err != nil {
			return nil, authUnreadable(err, "API token")
		}
		u, err := h.st.Admin(t.User)
		if errors.Is(err, store.ErrNotFound) {
			return nil, errf(http.StatusUnauthorized, "the token's account no longer exists")
		} else if err != nil {
			return nil, authUnreadable(err, "API token's account")
		}
		if h.afterAuthRead != nil {
			h.afterAuthRead()
		}
		// Only if it still exists: a token deleted since it was read
		// (by its user, recovery, a password change) stays deleted.
		if now.Sub(t.LastUsed) > time.Minute {
			if err := h.o.Store.TouchAPIToken(t.Hash, now); errors.Is(err, store.ErrNotFound) {
				return nil, errf(http.StatusUnauthorized, "unknown API token")
			} else if err != nil {
				h.log.Warn("API token's last use not recorded", "token", t.ID, "err", err)
			}
		}
		return &principal{user: u.Name, role: u.Role, token: t.ID, remote: remoteIP(r)}, nil
	}
	c, err := r.Cookie(sessionCookie)
	if err != nil || c.Value == "" {
		return nil, nil
	}
	s, err := h.st.Session(hashToken(c.Value))
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	} else if err != nil {
		return nil, authUnreadable(err, "session")
	}
	// An ended session does not authenticate, whether or not it can be
	// deleted: one left in the store is refused the same way at its next
	// use, and deleted then or swept at the next login.
	if now.Sub(s.LastSeen) > h.o.IdleTimeout || now.Sub(s.Created) > h.o.MaxAge {
		h.endSession(r, s, "expired")
		return nil, nil
	}
	u, err := h.st.Admin(s.User)
	if errors.Is(err, store.ErrNotFound) {
		h.endSession(r, s, "account gone")
		return nil, nil
	} else if err != nil {
		return nil, authUnreadable(err, "session's account")
	}
	if h.afterAuthRead != nil {
		h.afterAuthRead()
	}
	// Touch at most once a minute: a write per request would wear the
	// router's flash. Only if it still exists: a session ended since it
	// was read (logout, recovery, account deleted) stays ended.
	if now.Sub(s.LastSeen) > time.Minute {
		if err := h.o.Store.TouchSession(s.Hash, now); errors.Is(err, store.ErrNotFound) {
			return nil, nil
		} else if err != nil {
			h.log.Warn("session's last use not recorded", "user", s.User, "err", err)
		}
		s.LastSeen = now
	}
	return &principal{user: u.Name, role: u.Role, session: &s, remote: remoteIP(r)}, nil
}

// authUnreadable is authenticate's answer when the store could not read
// what (the session, the API token, their account): 503, saying the
// session or token still stands. The cause goes to the log only: the
// request is not authenticated.
func authUnreadable(err error, what string) error {
	return &httpError{code: http.StatusServiceUnavailable, err: fmt.Errorf("authenticate: read the %s: %w", what, err),
		msg: "The gateway could not read its state to check your login (see the gateway log). You are still logged in: try again in a moment."}
}

// endSession deletes the session s, which no longer authenticates (why),
// and logs a failure to: the session stays refused, but stays stored.
func (h *Handler) endSession(r *http.Request, s store.Session, why string) {
	if err := h.st.DeleteSession(s.Hash); err != nil {
		h.log.WarnContext(r.Context(), "console: a session that no longer authenticates could not be deleted; it stays refused", "why", why, "user", s.User, "remote", remoteIP(r), "err", err)
	}
}

// parseBearer extracts the token from "Bearer <token>".
func parseBearer(v string) (string, bool) {
	scheme, tok, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	if len(tok) < 16 || len(tok) > 128 {
		return "", false
	}
	for _, c := range tok {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return "", false
		}
	}
	return tok, true
}

func unsafeMethod(m string) bool {
	return m != http.MethodGet && m != http.MethodHead && m != http.MethodOptions
}

// checkCSRF enforces the synchronizer token of the session on every state
// change made with a session cookie. API tokens are not ambient
// credentials, so they need none.
func checkCSRF(r *http.Request, p *principal) error {
	if p.session == nil {
		return nil
	}
	got := r.Header.Get("X-CSRF-Token")
	if got == "" && isForm(r) {
		got = r.PostFormValue("csrf")
	}
	if got == "" || subtle.ConstantTimeCompare([]byte(got), []byte(p.session.CSRF)) != 1 {
		return refuse(ReasonCSRF, http.StatusForbidden, "missing or wrong CSRF token: reload the page and try again")
	}
	return nil
}

func isForm(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return strings.HasPrefix(ct, "application/x-www-form-urlencoded") || strings.HasPrefix(ct, "multipart/form-data")
}

func isJSON(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return ct == "application/json" || strings.HasPrefix(ct, "application/json;")
}

// checkPreCSRF protects the forms used before login (setup, login,
// recovery): a browser form must echo the __Host- cookie's token; a JSON
// request needs the application/json type, which a cross-site form cannot
// send without a preflight this server never grants.
func checkPreCSRF(r *http.Request) error {
	if isJSON(r) {
		return nil
	}
	c, err := r.Cookie(preCookie)
	got := r.PostFormValue("csrf")
	if err != nil || c.Value == "" || got == "" || subtle.ConstantTimeCompare([]byte(c.Value), []byte(got)) != 1 {
		return refuse(ReasonCSRF, http.StatusForbidden, "missing or wrong form token: reload the page and try again")
	}
	return nil
}

// preToken returns the pre-login form token, setting its cookie if needed.
func preToken(w http.ResponseWriter, r *http.Request) string {
	if c, err := r.Cookie(preCookie); err == nil && len(c.Value) == 43 {
		return c.Value
	}
	t := randomToken()
	http.SetCookie(w, &http.Cookie{Name: preCookie, Value: t, Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	return t
}

const maxBody = 64 << 10

// parseForm reads a form body (already bounded by maxBody).
func parseForm(r *http.Request) error {
	var err error
	if strings.HasPrefix(r.Header.Get("Content-Type"), "multipart/form-data") {
		err = r.ParseMultipartForm(maxBody)
	} else {
		err = r.ParseForm()
	}
	if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
		return refuse(ReasonTooLarge, http.StatusBadRequest, "form larger than %d bytes", mbe.Limit)
	}
	if err != nil {
		return errf(http.StatusBadRequest, "form: %v", err)
	}
	return nil
}

// decodeJSON reads a bounded JSON body into v, refusing unknown fields and
// trailing data.
func decodeJSON(r *http.Request, v any) error {
	if !isJSON(r) {
		return errf(http.StatusUnsupportedMediaType, "send Content-Type: application/json")
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return refuse(ReasonTooLarge, http.StatusBadRequest, "request body larger than %d bytes", mbe.Limit)
		}
		return errf(http.StatusBadRequest, "request body: %v", err)
	}
	if dec.More() {
		return errf(http.StatusBadRequest, "request body: trailing data after the JSON object")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// fail answers an error: JSON for the API, a page for browsers.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := statusOf(err)
	if reason, ok := refusalReason(err, code); ok {
		h.refused(reason)
	}
	if code >= 500 {
		args := []any{"method", r.Method, "path", r.URL.Path, "err", err}
		if he := (*httpError)(nil); errors.As(err, &he) && he.err != nil {
			args = append(args, "cause", he.err) // the message may not name it
		}
		h.log.Error("console request failed", args...)
	}
	if code == http.StatusTooManyRequests {
		var le *lockedError
		if errors.As(err, &le) {
			w.Header().Set("Retry-After", strconv.Itoa(int(le.wait.Seconds())+1))
		}
	}
	if strings.HasPrefix(r.URL.Path, "/api/") {
		writeJSON(w, code, map[string]string{"error": msg})
		return
	}
	h.pages.render(w, code, "error", &view{Title: http.StatusText(code), Error: msg})
}

type lockedError struct{ wait time.Duration }

func (e *lockedError) Error() string {
	return fmt.Sprintf("too many failed logins: try again in %s", e.wait.Round(time.Second))
}

// setFlash remembers a one-line message for the session's next page.
func (h *Handler) setFlash(p *principal, msg string) {
	if p.session == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.flashes) > 1000 {
		clear(h.flashes)
	}
	h.flashes[p.session.Hash] = msg
}

func (h *Handler) takeFlash(p *principal) string {
	if p == nil || p.session == nil {
		return ""
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	m := h.flashes[p.session.Hash]
	delete(h.flashes, p.session.Hash)
	return m
}
