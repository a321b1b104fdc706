package console

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway/store"
)

// The functions here are the console's actions. The JSON API and the HTML
// forms both decode their input into the same structs and call the same
// function, so the two cannot drift apart.

type loginInput struct {
	User     string `json:"user"`
	Password string `json:"password"`
}

type setupInput struct {
	Code     string `json:"code"`
	User     string `json:"user"`
	Password string `json:"password"`
}

// validUser: lower-case letters, digits, . _ -; 1-32 characters.
func validUser(n string) error {
	if len(n) < 1 || len(n) > 32 {
		return errf(http.StatusBadRequest, "user name: use 1-32 characters a-z 0-9 . _ -")
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return errf(http.StatusBadRequest, "user name %q: use 1-32 characters a-z 0-9 . _ -", n)
		}
	}
	return nil
}

func validRole(r string) error {
	if r != RoleAdmin && r != RoleViewer {
		return errf(http.StatusBadRequest, "role %q: use admin or viewer", r)
	}
	return nil
}

func checkNewPassword(user, pw string) error {
	if err := CheckPassword(user, pw); err != nil {
		return refuse(ReasonWeakPassword, http.StatusBadRequest, "%s", err.Error())
	}
	return nil
}

// newSession creates a fresh session for user, replacing old (rotation at
// login: an id an attacker planted before login is worthless after it).
func (h *Handler) newSession(w http.ResponseWriter, r *http.Request, user string) (store.Session, error) {
	// Neither failure below stops the login: a session left in the store
	// still ends at its idle or absolute limit (authenticate checks both),
	// but until then the one the browser presented still works, which the
	// log must say.
	if c, err := r.Cookie(sessionCookie); err == nil {
		if err := h.st.DeleteSession(hashToken(c.Value)); err != nil {
			h.log.WarnContext(r.Context(), "console: login: the browser's previous session could not be deleted; it works until it expires", "user", user, "remote", remoteIP(r), "err", err)
		}
	}
	now := h.o.Now()
	// Sweep expired sessions now and then: logins are rare enough.
	if err := h.st.DeleteSessions("", func(s store.Session) bool {
		return now.Sub(s.LastSeen) > h.o.IdleTimeout || now.Sub(s.Created) > h.o.MaxAge
	}); err != nil {
		h.log.WarnContext(r.Context(), "console: login: expired sessions could not be swept; the next login tries again", "user", user, "remote", remoteIP(r), "err", err)
	}
	id := randomToken()
	s := store.Session{Hash: hashToken(id), User: user, CSRF: randomToken(), Created: now, LastSeen: now, Remote: remoteIP(r)}
	if err := h.st.PutSession(s); err != nil {
		return s, fmt.Errorf("store session: %w", err)
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: id, Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	return s, nil
}

func clearSessionCookie(w http.ResponseWriter) {
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode, MaxAge: -1})
}

func (h *Handler) adminExists() bool {
	_, err := h.o.Store.Meta(MetaAdminExists)
	return err == nil
}

// doLogin checks the password under the throttle and opens a session.
func (h *Handler) doLogin(ctx context.Context, w http.ResponseWriter, r *http.Request, in loginInput) (store.Session, error) {
	now, src := h.o.Now(), remoteIP(r)
	user := strings.ToLower(strings.TrimSpace(in.User))
	if len(user) > 64 {
		user = user[:64]
	}
	until, userLocked := h.thr.loginLockedUntil(now, user, src)
	if !until.IsZero() {
		// Counted, so hammering a locked account extends the lockout, but
		// adding no key (failLocked); not audited one by one, so a flood
		// cannot wear the flash.
		h.thr.failLocked(now, user, src)
		return store.Session{}, &lockedError{wait: until.Sub(now)}
	}
	u, err := h.o.Store.Admin(user)
	hash := u.PasswordHash
	if err != nil {
		hash = dummyHash
	}
	ok, verr := h.hash.verify(ctx, hash, in.Password)
	if verr != nil && err == nil {
		return store.Session{}, fmt.Errorf("login %q: %w", user, verr)
	}
	if err != nil || !ok {
		h.thr.failLogin(now, user, src)
		h.refusalAudit(ctx, Actor{Name: "anonymous", Remote: src}, "console.login_failed", user, "")
		return store.Session{}, refuse(ReasonBadLogin, http.StatusUnauthorized, "wrong user name or password")
	}
	// The user's count starts over, unless the user was locked out: then
	// someone else is guessing (this source had no failure, or it would
	// have been refused), and the lockout is lifted for the user's other
	// sources but the failures stay, so that the guesser's next one locks
	// it again. The source's lockout, if any, is lifted but its failures
	// stay: one account of its own must not let a source wipe the
	// failures it made against other accounts (the right password between
	// every few wrong ones would never be locked out). The source's /64 is
	// left as it is: the whole LAN may share it.
	if userLocked {
		h.thr.Unlock("u:" + user)
	} else {
		h.thr.Reset("u:" + user)
	}
	h.thr.Unlock("s:" + src)
	s, err := h.newSession(w, r, u.Name)
	if err != nil {
		return s, err
	}
	h.audit(ctx, Actor{Name: u.Name, Remote: src}, "console.login", u.Name, "")
	h.flushRefusalAudit(ctx, "login")
	return s, nil
}

// doSetup creates the first admin with the one-time setup code, then logs
// them in. The code, printed on the box's console, is the proof of
// presence: nothing else grants setup (a button press would grant it to
// whichever LAN client asked first after it).
func (h *Handler) doSetup(ctx context.Context, w http.ResponseWriter, r *http.Request, in setupInput) (store.Session, error) {
	now, src := h.o.Now(), remoteIP(r)
	if h.adminExists() {
		return store.Session{}, errf(http.StatusConflict, "an admin already exists: log in, or use password recovery")
	}
	if until := h.thr.LockedUntil(now, prefixed("setup:", sourceKeys(src))...); !until.IsZero() {
		return store.Session{}, &lockedError{wait: until.Sub(now)}
	}
	user := strings.TrimSpace(in.User)
	if err := validUser(user); err != nil {
		return store.Session{}, err
	}
	if err := checkNewPassword(user, in.Password); err != nil {
		return store.Session{}, err
	}
	if !h.o.Gateway.CheckSetupCode(in.Code) {
		for _, k := range sourceKeys(src) {
			h.thr.Fail(now, "setup:"+k, 5)
		}
		h.refusalAudit(ctx, Actor{Name: "anonymous", Remote: src}, "console.setup_refused", user, "wrong setup code")
		return store.Session{}, refuse(ReasonBadCode, http.StatusForbidden, "wrong setup code: use the code bastiond printed on the box's console when it started")
	}
	ph, err := h.hash.hash(ctx, in.Password)
	if err != nil {
		return store.Session{}, err
	}
	u := store.AdminUser{Name: user, Role: RoleAdmin, PasswordHash: ph, Created: now, PasswordSet: now}
	if err := h.o.Store.CreateFirstAdmin(u, MetaAdminExists, MetaSetupCode); err != nil {
		return store.Session{}, err
	}
	h.audit(ctx, Actor{Name: user, Remote: src}, "console.setup", user, "first admin created with the setup code")
	h.flushRefusalAudit(ctx, "setup")
	return h.newSession(w, r, user)
}

// doRecover sets a password with a recovery code from the box (bastionctl
// as root, or the pairing button held 10 s, shown on the box): the account is created as admin if it does not exist, all its
// sessions end, its API tokens are deleted, and its failures and those of
// the recovering address are forgotten.
func (h *Handler) doRecover(ctx context.Context, r *http.Request, in setupInput) error {
	now, src := h.o.Now(), remoteIP(r)
	if until := h.thr.LockedUntil(now, prefixed("recover:", sourceKeys(src))...); !until.IsZero() {
		return &lockedError{wait: until.Sub(now)}
	}
	user := strings.TrimSpace(in.User)
	if err := validUser(user); err != nil {
		return err
	}
	if err := checkNewPassword(user, in.Password); err != nil {
		return err
	}
	ok, err := h.checkRecoveryCode(in.Code)
	if err != nil {
		return err
	}
	if !ok {
		for _, k := range sourceKeys(src) {
			h.thr.Fail(now, "recover:"+k, 5)
		}
		h.refusalAudit(ctx, Actor{Name: "anonymous", Remote: src}, "console.recover_refused", user, "wrong recovery code")
		return refuse(ReasonBadCode, http.StatusForbidden, "wrong or expired recovery code: run `bastionctl console recover` as root on the box, or hold the pairing button 10 s with no pairing window open, for a new code")
	}
	ph, err := h.hash.hash(ctx, in.Password)
	if err != nil {
		return err
	}
	// Setup is closed before the password is set, the setup code first: a
	// failure at any step leaves the account as it was and no setup code
	// that works beside a recovered account (one deleted, then setup
	// marked done). Each of the three writes is its own transaction.
	const unchanged = "the account is unchanged and the recovery code is spent: get a new recovery code and try again"
	if err := h.st.SetMeta(MetaSetupCode, nil); err != nil {
		return storeFailed(err, "Recovery of %q stopped: deleting the first-admin setup code failed (%v); %s.", user, err, unchanged)
	}
	if err := h.st.SetMeta(MetaAdminExists, []byte(now.UTC().Format(time.RFC3339))); err != nil {
		return storeFailed(err, "Recovery of %q stopped: the first-admin setup code is deleted, but marking setup as done failed (%v); %s.", user, err, unchanged)
	}
	// Whoever had the account may have made API tokens, which never
	// expire: they go with its sessions, in the transaction that sets the
	// password, so a failure leaves the account as it was.
	tokens, err := h.st.RecoverAdmin(user, ph, now)
	if err != nil {
		return storeFailed(err, "Recovery of %q stopped: setup is closed, but setting the password and ending the account's sessions and API tokens failed (%v); %s.", user, err, unchanged)
	}
	// The code proves presence at the box, so the recovering address is
	// the owner's: its failures go too, or a typo made while someone
	// held the account's lockout would keep the owner refused from it
	// (the user's lockout refuses an address that has failed) for 24 h.
	// Not its /64's: a guesser on the same prefix shares that.
	h.thr.Reset("u:"+user, "s:"+src)
	h.audit(ctx, Actor{Name: user, Remote: src}, "console.recover", user,
		fmt.Sprintf("password set with the recovery code; sessions ended, %d API token(s) deleted", tokens))
	h.flushRefusalAudit(ctx, "recovery")
	return nil
}

func (h *Handler) doLogout(ctx context.Context, w http.ResponseWriter, p *principal) error {
	if p.session != nil {
		if err := h.o.Store.DeleteSession(p.session.Hash); err != nil {
			return err
		}
	}
	clearSessionCookie(w)
	h.audit(ctx, p.actor(), "console.logout", p.user, "")
	return nil
}

// deviceView is a device as the console shows it.
type deviceView struct {
	store.Device
	Counters *DeviceCounters `json:"counters,omitempty"`
}

// listDevices lists the devices matching q, each with its last-seen time
// from the bridges' traffic as getDevice shows it (the store's LastSeen is
// not written: the time lives in memory only, and not at all while the
// device.last_seen opt-out is on, which the traffic then no longer has).
func (h *Handler) listDevices(ctx context.Context, q string) ([]store.Device, error) {
	ds, err := h.o.Store.Devices()
	if err != nil {
		return nil, err
	}
	traffic := h.c().Traffic
	q = strings.ToLower(strings.TrimSpace(q))
	out := ds[:0]
	for _, d := range ds {
		if q == "" || strings.Contains(strings.ToLower(d.Name+" "+d.ID+" "+d.Vendor+" "+d.Model), q) {
			d.SecretHash = ""
			if traffic != nil {
				if c, ok := traffic.Counters(ctx, d.ID); ok && c.LastSeen.After(d.LastSeen) {
					d.LastSeen = c.LastSeen
				}
			}
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b store.Device) int {
		if a.Revoked != b.Revoked {
			if a.Revoked {
				return 1
			}
			return -1
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out, nil
}

func (h *Handler) getDevice(ctx context.Context, id string) (deviceView, error) {
	d, err := h.o.Store.Device(id)
	if err != nil {
		return deviceView{}, err
	}
	d.SecretHash = ""
	v := deviceView{Device: d}
	if h.c().Traffic != nil {
		if c, ok := h.c().Traffic.Counters(ctx, id); ok {
			v.Counters = &c
			if c.LastSeen.After(v.LastSeen) {
				v.LastSeen = c.LastSeen
			}
		}
	}
	return v, nil
}

func validDeviceName(n string) error {
	if n == "" || len(n) > 64 || !utf8.ValidString(n) {
		return errf(http.StatusBadRequest, "device name: use 1-64 printable characters")
	}
	for _, r := range n {
		if r < 0x20 || r == 0x7f {
			return errf(http.StatusBadRequest, "device name: use 1-64 printable characters")
		}
	}
	return nil
}

func (h *Handler) addDevice(ctx context.Context, p *principal, in DeviceRequest) (Credentials, error) {
	if err := validDeviceName(in.Name); err != nil {
		return Credentials{}, err
	}
	return h.o.Gateway.AddDevice(ctx, in, p.actor())
}

type renameInput struct {
	Name string `json:"name"`
}

func (h *Handler) renameDevice(ctx context.Context, p *principal, id string, in renameInput) (store.Device, error) {
	if err := validDeviceName(in.Name); err != nil {
		return store.Device{}, err
	}
	var old string
	d, err := h.o.Store.UpdateDevice(id, func(d *store.Device) error {
		if d.Revoked {
			return errf(http.StatusConflict, "device %s is revoked", id)
		}
		old, d.Name = d.Name, in.Name
		return nil
	})
	if err != nil {
		return d, err
	}
	h.audit(ctx, p.actor(), "device.rename", id, "from "+strconv.Quote(old)+" to "+strconv.Quote(in.Name))
	d.SecretHash = ""
	return d, nil
}

func (h *Handler) revokeDevice(ctx context.Context, p *principal, id string) error {
	if _, err := h.o.Store.Device(id); err != nil {
		return err
	}
	return h.o.Gateway.RevokeDevice(ctx, id, p.actor())
}

// deviceExport is everything the gateway holds about one device.
type deviceExport struct {
	Device       store.Device    `json:"device"`
	Counters     *DeviceCounters `json:"counters,omitempty"`
	Certificates []store.Cert    `json:"certificates"`
	Audit        []store.Event   `json:"audit"`
	// FirmwareStatus is the device's latest firmware update status report
	// as stored (its "at" is when the status last changed).
	FirmwareStatus json.RawMessage `json:"firmware_status,omitempty"`
	// Retained are the device's retained MQTT messages, by topic, as
	// stored (the broker's record: payload in base64, flags, properties).
	Retained map[string]json.RawMessage `json:"retained"`
	// Upstream is the device's telemetry the upstream link holds, queued
	// or parked (absent with the link off).
	Upstream *UpstreamMessages `json:"upstream,omitempty"`
	Exported time.Time         `json:"exported"`
}

// The export lists at most exportMessages of a device's queued and parked
// messages, and about exportMessageBytes of their payloads: a router's
// memory holds the export whole. The counts are complete.
const (
	exportMessages     = 1000
	exportMessageBytes = 4 << 20
)

func (h *Handler) exportDevice(ctx context.Context, p *principal, id string) (deviceExport, error) {
	v, err := h.getDevice(ctx, id)
	if err != nil {
		return deviceExport{}, err
	}
	ex := deviceExport{Device: v.Device, Counters: v.Counters, Exported: h.o.Now(), Certificates: []store.Cert{}, Audit: []store.Event{}, Retained: map[string]json.RawMessage{}}
	cs, err := h.o.Store.Certs()
	if err != nil {
		return ex, err
	}
	for _, c := range cs {
		if c.Device == id {
			ex.Certificates = append(ex.Certificates, c)
		}
	}
	fw, err := h.o.Store.FirmwareStatus(id)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return ex, err
	}
	ex.FirmwareStatus = fw
	rm, err := h.o.Store.RetainedUnder(bridges.TopicPrefix(id))
	if err != nil {
		return ex, err
	}
	ex.Retained = make(map[string]json.RawMessage, len(rm))
	for topic, v := range rm {
		if !json.Valid(v) { // not the broker's JSON: exported as bytes (base64)
			v, _ = json.Marshal(v)
		}
		ex.Retained[topic] = v
	}
	if uq, ok := h.c().Upstream.(UpstreamQueues); ok {
		um, err := uq.DeviceMessages(ctx, id, exportMessages, exportMessageBytes)
		if err != nil {
			return ex, err
		}
		ex.Upstream = &um
	}
	var before uint64
	for range 100 { // at most 100 pages of the audit log
		es, err := h.o.Store.AuditLog(500, before)
		if err != nil {
			return ex, err
		}
		for _, e := range es {
			if e.Target == id || e.Actor == "device:"+id {
				ex.Audit = append(ex.Audit, e)
			}
		}
		if len(es) < 500 {
			break
		}
		before = es[len(es)-1].Seq
	}
	h.audit(ctx, p.actor(), "privacy.export", id, "")
	return ex, nil
}

// eraseDevice revokes the device and deletes what describes it (name,
// vendor, model, version, last seen, firmware update status), its
// retained MQTT messages, and its telemetry the upstream link holds
// (queued or parked). The id and the revoked certificate serials stay,
// because forgetting them would let the old credentials in again; the
// audit log stays as the security record. A revocation alone leaves the
// queued telemetry to be sent: it was accepted while the device was
// trusted, and its device was told it was stored.
func (h *Handler) eraseDevice(ctx context.Context, p *principal, id string) error {
	d, err := h.o.Store.Device(id)
	if err != nil {
		return err
	}
	if !d.Revoked {
		if err := h.o.Gateway.RevokeDevice(ctx, id, p.actor()); err != nil {
			return err
		}
	}
	// Past the revocation, a step that fails leaves done what came before
	// it: the audit log says which, as it says a whole erase.
	stopped := func(step, done string, err error) error {
		h.audit(ctx, p.actor(), "privacy.erase", id, fmt.Sprintf("erase stopped: %s failed (%v); done: %s", step, err, done))
		return err
	}
	_, err = h.o.Store.UpdateDevice(id, func(d *store.Device) error {
		*d = store.Device{ID: d.ID, Name: "erased-" + d.ID, Auth: d.Auth, PSKIdentity: d.PSKIdentity, Created: d.Created}
		return nil
	})
	if err != nil {
		return stopped("deleting the device record", "revoked", err)
	}
	// Its firmware update status goes too; through the cache when there is
	// one, which holds it in memory as well.
	if fw := h.c().Firmware; fw != nil {
		err = fw.ForgetDevice(ctx, id)
	} else {
		err = h.o.Store.DeleteFirmwareStatus(id)
	}
	if err != nil {
		return stopped("deleting the firmware status", "revoked, device record deleted", err)
	}
	// Its retained MQTT messages go from the running broker, which would
	// otherwise give them to new subscribers until they expire (an hour
	// after their publish), and from the store. After the revocation
	// above, so that the device sends none again.
	n, err := h.o.Gateway.DropRetained(ctx, id)
	if err != nil {
		return stopped("deleting the retained MQTT messages", "revoked, device record and firmware status deleted", err)
	}
	// Its telemetry waiting for the cloud goes too, after the revocation
	// (no new message of it is accepted): queued, it would be sent after
	// the erase, and parked, it is kept for years and listed with its id.
	var queued, parked int
	if uq, ok := h.c().Upstream.(UpstreamQueues); ok {
		if queued, parked, err = uq.DropDevice(ctx, id); err != nil {
			return stopped("deleting the queued and parked upstream messages", fmt.Sprintf("revoked, device record, firmware status and %d retained MQTT message(s) deleted, %d queued and %d parked upstream message(s) deleted before the failure", n, queued, parked), err)
		}
	}
	h.audit(ctx, p.actor(), "privacy.erase", id, fmt.Sprintf("device data, %d retained MQTT message(s), %d queued and %d parked upstream message(s) deleted; id and revocation kept", n, queued, parked))
	return nil
}

type expectInput struct {
	Name string `json:"name"`
	Code string `json:"code"`
}

// parseSetupCode accepts a device label's setup code: 8-11 digit manual
// codes, "MT:" QR payloads and dashed groups, 8-64 characters of
// A-Z a-z 0-9 - . : with spaces removed.
func parseSetupCode(s string) (string, error) {
	s = strings.ReplaceAll(strings.TrimSpace(s), " ", "")
	if len(s) < 8 || len(s) > 64 {
		return "", errf(http.StatusBadRequest, "setup code: 8-64 characters as printed on the device's label")
	}
	for _, c := range s {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == ':') {
			return "", errf(http.StatusBadRequest, "setup code: only letters, digits, - . : as printed on the label")
		}
	}
	return s, nil
}

const expectTTL = 24 * time.Hour

func (h *Handler) expectDevice(ctx context.Context, p *principal, in expectInput) (store.ExpectedDevice, error) {
	if err := validDeviceName(in.Name); err != nil {
		return store.ExpectedDevice{}, err
	}
	code, err := parseSetupCode(in.Code)
	if err != nil {
		return store.ExpectedDevice{}, err
	}
	now := h.o.Now()
	e, err := h.o.Store.ExpectDevice(store.ExpectedDevice{Name: in.Name, Code: code, Created: now, Expires: now.Add(expectTTL), By: p.user})
	if err != nil {
		return e, err
	}
	h.audit(ctx, p.actor(), "pairing.expect", e.ID, "name="+strconv.Quote(in.Name))
	e.Code = ""
	return e, nil
}

func (h *Handler) expectedDevices() ([]store.ExpectedDevice, error) {
	es, err := h.o.Store.ExpectedDevices()
	now := h.o.Now()
	out := es[:0]
	for _, e := range es {
		if now.After(e.Expires) {
			// Expired, it is neither shown nor used by pairing (which
			// checks the expiry itself), deleted or not; not deleted, it
			// is tried again at the next listing.
			if err := h.st.DeleteExpectedDevice(e.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
				h.log.Warn("console: an expired expected device could not be deleted; it stays hidden and unused", "expected", e.ID, "name", e.Name, "err", err)
			}
			continue
		}
		e.Code = "" // a secret: never shown again
		out = append(out, e)
	}
	return out, err
}

func (h *Handler) unexpectDevice(ctx context.Context, p *principal, id string) error {
	if err := h.o.Store.DeleteExpectedDevice(id); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "pairing.unexpect", id, "")
	return nil
}

type ruleInput struct {
	Topic  string   `json:"topic"`
	Action string   `json:"action"`
	Fields []string `json:"fields,omitempty"`
}

// parseRule validates a forwarding rule: an MQTT topic filter inside the
// devices/ namespace (+ and # only as whole levels, # last), an action, and
// for redact the JSON fields to remove.
func parseRule(in ruleInput) (store.ForwardRule, error) {
	t := in.Topic
	if t == "" || len(t) > 256 || !utf8.ValidString(t) || strings.ContainsRune(t, 0) {
		return store.ForwardRule{}, errf(http.StatusBadRequest, "topic: a filter of at most 256 bytes such as devices/+/t/temperature")
	}
	levels := strings.Split(t, "/")
	if levels[0] != "devices" || len(levels) < 2 {
		return store.ForwardRule{}, errf(http.StatusBadRequest, "topic %q: must start with devices/", t)
	}
	for i, l := range levels {
		if strings.ContainsAny(l, "+#") && len(l) != 1 {
			return store.ForwardRule{}, errf(http.StatusBadRequest, "topic %q: + and # must be whole levels", t)
		}
		if l == "#" && i != len(levels)-1 {
			return store.ForwardRule{}, errf(http.StatusBadRequest, "topic %q: # must be the last level", t)
		}
	}
	switch in.Action {
	case "forward", "local":
		if len(in.Fields) > 0 {
			return store.ForwardRule{}, errf(http.StatusBadRequest, "fields: only for action redact")
		}
	case "redact":
		if len(in.Fields) == 0 || len(in.Fields) > 32 {
			return store.ForwardRule{}, errf(http.StatusBadRequest, "fields: redact needs 1-32 JSON field names")
		}
		for _, f := range in.Fields {
			if f == "" || len(f) > 64 {
				return store.ForwardRule{}, errf(http.StatusBadRequest, "field %q: 1-64 characters a-z A-Z 0-9 _ . -", f)
			}
			for _, c := range f {
				if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
					return store.ForwardRule{}, errf(http.StatusBadRequest, "field %q: 1-64 characters a-z A-Z 0-9 _ . -", f)
				}
			}
			// The upstream link refuses these too: saved, such a rule would
			// stop the link from taking any rule, and from starting.
			if strings.HasPrefix(f, ".") || strings.HasSuffix(f, ".") || strings.Contains(f, "..") {
				return store.ForwardRule{}, errf(http.StatusBadRequest, "field %q: a name, or names joined by single dots (gps.lat)", f)
			}
		}
	default:
		return store.ForwardRule{}, errf(http.StatusBadRequest, "action %q: use forward, redact or local", in.Action)
	}
	return store.ForwardRule{Topic: t, Action: in.Action, Fields: in.Fields}, nil
}

// splitFields parses the form's comma-separated field list.
func splitFields(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func (h *Handler) putRule(ctx context.Context, p *principal, in ruleInput) (store.ForwardRule, error) {
	r, err := parseRule(in)
	if err != nil {
		return r, err
	}
	r.Updated, r.By = h.o.Now(), p.user
	r, err = h.o.Store.PutForwardRule(r)
	if err != nil {
		return r, err
	}
	h.audit(ctx, p.actor(), "upstream.rule", r.ID, r.Topic+" → "+r.Action+" "+strings.Join(r.Fields, ","))
	if err := h.rulesChanged(); err != nil {
		return r, err
	}
	return r, nil
}

// rulesChanged has the upstream link put the saved rules in force. When
// that fails the change is saved but not in force: the link still applies
// the previous rules (which may forward what the user just made local), or
// holds (the gateway could not read the privacy settings back): the user
// must know, and the answer says so, with what applies instead, rather than
// the usual success. It is called also when the rules cannot be read back
// (a record that does not decode): the gateway then puts the hold in force.
// It read them here first and, failing, never told the gateway, which left
// the link on the rules it had before.
func (h *Handler) rulesChanged() error {
	f := h.c().RulesChanged
	if f == nil {
		return nil
	}
	if err := f(); err != nil {
		return errf(http.StatusInternalServerError, "The change is saved, but it is not in force: %v. Fix the cause, then save or delete a rule to apply the rules again.", err)
	}
	return nil
}

func (h *Handler) deleteRule(ctx context.Context, p *principal, id string) error {
	if err := h.o.Store.DeleteForwardRule(id); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "upstream.rule_delete", id, "")
	return h.rulesChanged()
}

type optOutInput struct {
	Datum  string `json:"datum"`
	OptOut bool   `json:"opt_out"`
}

func (h *Handler) setOptOut(ctx context.Context, p *principal, in optOutInput) error {
	d, ok := datumByID(in.Datum)
	if !ok {
		return errf(http.StatusBadRequest, "datum %q: not in the privacy statement", in.Datum)
	}
	if !d.Optional {
		return errf(http.StatusBadRequest, "datum %q is needed for the gateway to work and cannot be switched off", in.Datum)
	}
	// One change at a time, from saving to handing over: of two at once,
	// the one that read the set first could hand it over last, and the
	// gateway would apply a set the store no longer holds.
	select {
	case h.optOutLock <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("privacy opt-out of %s not changed: %w", in.Datum, ctx.Err())
	}
	defer func() { <-h.optOutLock }()
	if err := h.o.Store.SetOptOut(in.Datum, in.OptOut); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "privacy.optout", in.Datum, strconv.FormatBool(in.OptOut))
	f := h.c().OptOutsChanged
	if f == nil {
		return nil
	}
	m, err := h.st.OptOuts()
	if err != nil {
		// Saved but not handed over: the answer must not say the change
		// is in force.
		return storeFailed(err, "The change is saved, but the running gateway has not applied it: reading the opt-outs back failed (%v), so it may keep or drop data as before the change. Save the change again, or restart the gateway, to apply it.", err)
	}
	f(m)
	return nil
}

type adminInput struct {
	Name     string `json:"name"`
	Role     string `json:"role"`
	Password string `json:"password"`
}

type adminView struct {
	Name        string    `json:"name"`
	Role        string    `json:"role"`
	Created     time.Time `json:"created"`
	PasswordSet time.Time `json:"password_set"`
}

func (h *Handler) listAdmins() ([]adminView, error) {
	us, err := h.o.Store.Admins()
	out := []adminView{}
	for _, u := range us {
		out = append(out, adminView{u.Name, u.Role, u.Created, u.PasswordSet})
	}
	return out, err
}

func (h *Handler) addAdmin(ctx context.Context, p *principal, in adminInput) (adminView, error) {
	if err := validUser(in.Name); err != nil {
		return adminView{}, err
	}
	if err := validRole(in.Role); err != nil {
		return adminView{}, err
	}
	if err := checkNewPassword(in.Name, in.Password); err != nil {
		return adminView{}, err
	}
	ph, err := h.hash.hash(ctx, in.Password)
	if err != nil {
		return adminView{}, err
	}
	now := h.o.Now()
	if err := h.o.Store.AddAdmin(store.AdminUser{Name: in.Name, Role: in.Role, PasswordHash: ph, Created: now, PasswordSet: now}); err != nil {
		return adminView{}, err
	}
	h.audit(ctx, p.actor(), "admin.add", in.Name, "role="+in.Role)
	return adminView{in.Name, in.Role, now, now}, nil
}

type roleInput struct {
	Role string `json:"role"`
}

func (h *Handler) setRole(ctx context.Context, p *principal, name string, in roleInput) error {
	if err := validRole(in.Role); err != nil {
		return err
	}
	if _, err := h.o.Store.UpdateAdmin(name, func(u *store.AdminUser) error { u.Role = in.Role; return nil }); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "admin.role", name, in.Role)
	return nil
}

func (h *Handler) deleteAdmin(ctx context.Context, p *principal, name string) error {
	if err := h.o.Store.DeleteAdmin(name); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "admin.delete", name, "")
	return nil
}

type passwordInput struct {
	Current string `json:"current"`
	New     string `json:"new"`
}

// changePassword sets the caller's own password; every other session of
// theirs ends and every API token of theirs is deleted.
func (h *Handler) changePassword(ctx context.Context, p *principal, in passwordInput) error {
	now := h.o.Now()
	if until, _ := h.thr.loginLockedUntil(now, p.user, p.remote); !until.IsZero() {
		return &lockedError{wait: until.Sub(now)}
	}
	u, err := h.o.Store.Admin(p.user)
	if err != nil {
		return err
	}
	if ok, err := h.hash.verify(ctx, u.PasswordHash, in.Current); err != nil || !ok {
		h.thr.failLogin(h.o.Now(), p.user, p.remote)
		return refuse(ReasonBadLogin, http.StatusForbidden, "current password is wrong")
	}
	if err := checkNewPassword(p.user, in.New); err != nil {
		return err
	}
	ph, err := h.hash.hash(ctx, in.New)
	if err != nil {
		return err
	}
	// Who changes a password may fear someone else knows it, and could
	// have made API tokens with it, which never expire: all go, the one
	// this request came with too, in the transaction that sets the
	// password. The session that made the change stays.
	keep := ""
	if p.session != nil {
		keep = p.session.Hash
	}
	tokens, err := h.st.SetPasswordEndAccess(p.user, ph, h.o.Now(), keep)
	if errors.Is(err, store.ErrNotFound) {
		return err // the account was deleted meanwhile
	}
	if err != nil {
		return storeFailed(err, "The password of %q is unchanged: setting it and ending its other sessions and API tokens failed (%v). The old password, and every session and API token, still work. Try again.", p.user, err)
	}
	h.audit(ctx, p.actor(), "admin.password", p.user, fmt.Sprintf("other sessions ended, %d API token(s) deleted", tokens))
	return nil
}

type tokenInput struct {
	Label string `json:"label"`
}

type tokenView struct {
	ID       string    `json:"id"`
	Label    string    `json:"label"`
	User     string    `json:"user"`
	Created  time.Time `json:"created"`
	LastUsed time.Time `json:"last_used,omitzero"`
	Token    string    `json:"token,omitempty"` // only in the answer that creates it
}

func (h *Handler) listTokens(p *principal) ([]tokenView, error) {
	ts, err := h.o.Store.APITokens()
	out := []tokenView{}
	for _, t := range ts {
		if t.User == p.user || p.role == RoleAdmin {
			out = append(out, tokenView{ID: t.ID, Label: t.Label, User: t.User, Created: t.Created, LastUsed: t.LastUsed})
		}
	}
	return out, err
}

func (h *Handler) createToken(ctx context.Context, p *principal, in tokenInput) (tokenView, error) {
	if in.Label == "" || len(in.Label) > 64 || validDeviceName(in.Label) != nil {
		return tokenView{}, errf(http.StatusBadRequest, "label: 1-64 printable characters saying what the token is for")
	}
	tok := randomToken()
	t := store.APIToken{Hash: hashToken(tok), ID: hashToken(tok)[:12], Label: in.Label, User: p.user, Created: h.o.Now()}
	if err := h.o.Store.PutAPIToken(t); err != nil {
		return tokenView{}, err
	}
	h.audit(ctx, p.actor(), "token.create", t.ID, "label="+strconv.Quote(in.Label))
	return tokenView{ID: t.ID, Label: t.Label, User: t.User, Created: t.Created, Token: tok}, nil
}

func (h *Handler) deleteToken(ctx context.Context, p *principal, id string) error {
	user := p.user
	if p.role == RoleAdmin {
		user = ""
	}
	if err := h.o.Store.DeleteAPIToken(id, user); err != nil {
		return err
	}
	h.audit(ctx, p.actor(), "token.delete", id, "")
	return nil
}

var errNotAvailable = errf(http.StatusNotImplemented, "not available in this build")

func (h *Handler) firmwareCheck(ctx context.Context, p *principal) error {
	if h.c().Firmware == nil {
		return errNotAvailable
	}
	return h.c().Firmware.CheckNow(ctx, p.actor())
}
