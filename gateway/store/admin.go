package store

// Console state: admin accounts, sessions, API tokens, upstream forwarding
// rules, privacy opt-outs and device codes waiting for the next pairing
// window. Sessions and tokens are stored only as the SHA-256 of their
// random value, so a copy of the database does not log anyone in.

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bAdmins   = []byte("console_admins")   // name → AdminUser
	bSessions = []byte("console_sessions") // hex sha256(id) → Session
	bTokens   = []byte("console_tokens")   // hex sha256(token) → APIToken
	bRules    = []byte("forward_rules")    // id → ForwardRule
	bExpected = []byte("pairing_expected") // id → ExpectedDevice
	bOptOut   = []byte("privacy_optout")   // datum → "1"
)

// ErrExists is returned when a record that must be new already exists.
var ErrExists = errors.New("already exists")

// ErrLastAdmin is returned when a change would leave no admin account.
var ErrLastAdmin = errors.New("it would leave no admin account")

// AdminUser is one console account.
type AdminUser struct {
	Name         string    `json:"name"`
	Role         string    `json:"role"` // admin or viewer
	PasswordHash string    `json:"password_hash"`
	Created      time.Time `json:"created"`
	PasswordSet  time.Time `json:"password_set"`
}

// Session is a logged-in browser session. The id itself is never stored.
type Session struct {
	Hash     string    `json:"hash"`
	User     string    `json:"user"`
	CSRF     string    `json:"csrf"`
	Created  time.Time `json:"created"`
	LastSeen time.Time `json:"last_seen"`
	Remote   string    `json:"remote,omitempty"`
}

// APIToken is a bearer token for the JSON API, acting as its user.
type APIToken struct {
	Hash     string    `json:"hash"`
	ID       string    `json:"id"` // short public handle, shown in lists
	Label    string    `json:"label"`
	User     string    `json:"user"`
	Created  time.Time `json:"created"`
	LastUsed time.Time `json:"last_used,omitzero"`
}

// ForwardRule says what the upstream link does with messages whose device
// topic matches Topic (an MQTT filter such as devices/+/t/temperature).
// The upstream code reads these with ForwardRules; the console writes them.
type ForwardRule struct {
	ID      string    `json:"id"`
	Topic   string    `json:"topic"`
	Action  string    `json:"action"`           // forward, redact, local
	Fields  []string  `json:"fields,omitempty"` // JSON fields removed by redact
	Updated time.Time `json:"updated"`
	By      string    `json:"by,omitempty"`
}

// ExpectedDevice is a device announced by its setup code for the next
// pairing window. The pairing code consumes it.
type ExpectedDevice struct {
	ID      string    `json:"id"`
	Name    string    `json:"name"`
	Code    string    `json:"code"` // the label's setup code, needed to run the PAKE
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
	By      string    `json:"by"`
}

func (s *Store) update(bucket []byte, fn func(b *bolt.Bucket) error) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucket)
		if err != nil {
			return err
		}
		return fn(b)
	})
}

// view runs fn on bucket; a bucket not created yet reads as empty.
func (s *Store) view(bucket []byte, fn func(b *bolt.Bucket) error) error {
	return s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		if b == nil {
			return ErrNotFound
		}
		return fn(b)
	})
}

func list[T any](s *Store, bucket []byte) ([]T, error) {
	var out []T
	err := s.view(bucket, func(b *bolt.Bucket) error {
		return b.ForEach(func(_, v []byte) error {
			var x T
			if err := json.Unmarshal(v, &x); err != nil {
				return err
			}
			out = append(out, x)
			return nil
		})
	})
	if errors.Is(err, ErrNotFound) {
		err = nil
	}
	return out, err
}

func one[T any](s *Store, bucket []byte, key string) (T, error) {
	var x T
	err := s.view(bucket, func(b *bolt.Bucket) error { return get(b, key, &x) })
	return x, err
}

// CreateFirstAdmin stores u as the first admin account and, in the same
// transaction, sets existsKey in meta and deletes codeKey, so the one-time
// setup code stops working exactly when the account exists. It fails with
// ErrExists if any account or the marker already exists.
func (s *Store) CreateFirstAdmin(u AdminUser, existsKey, codeKey string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bAdmins)
		if err != nil {
			return err
		}
		meta := tx.Bucket(bMeta)
		if k, _ := b.Cursor().First(); k != nil || meta.Get([]byte(existsKey)) != nil {
			return fmt.Errorf("create first admin %q: an admin %w", u.Name, ErrExists)
		}
		if err := put(b, u.Name, u); err != nil {
			return err
		}
		if err := meta.Put([]byte(existsKey), []byte(u.Created.UTC().Format(time.RFC3339))); err != nil {
			return err
		}
		return meta.Delete([]byte(codeKey))
	})
}

// AddAdmin creates a new account; the name must be free.
func (s *Store) AddAdmin(u AdminUser) error {
	return s.update(bAdmins, func(b *bolt.Bucket) error {
		if b.Get([]byte(u.Name)) != nil {
			return fmt.Errorf("add admin %q: %w", u.Name, ErrExists)
		}
		return put(b, u.Name, u)
	})
}

func adminCount(b *bolt.Bucket, except string) int {
	n := 0
	b.ForEach(func(k, v []byte) error {
		var u AdminUser
		if string(k) != except && json.Unmarshal(v, &u) == nil && u.Role == "admin" {
			n++
		}
		return nil
	})
	return n
}

// UpdateAdmin applies fn to the account name. A change that leaves no
// account with the admin role fails with ErrLastAdmin.
func (s *Store) UpdateAdmin(name string, fn func(*AdminUser) error) (AdminUser, error) {
	var out AdminUser
	err := s.update(bAdmins, func(b *bolt.Bucket) error {
		var u AdminUser
		if err := get(b, name, &u); err != nil {
			return fmt.Errorf("admin %q: %w", name, err)
		}
		if err := fn(&u); err != nil {
			return err
		}
		u.Name = name
		if u.Role != "admin" && adminCount(b, name) == 0 {
			return fmt.Errorf("change role of %q: %w", name, ErrLastAdmin)
		}
		out = u
		return put(b, name, u)
	})
	return out, err
}

// DeleteAdmin removes an account and all its sessions and tokens.
func (s *Store) DeleteAdmin(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bAdmins)
		if err != nil {
			return err
		}
		if b.Get([]byte(name)) == nil {
			return fmt.Errorf("delete admin %q: %w", name, ErrNotFound)
		}
		if adminCount(b, name) == 0 {
			return fmt.Errorf("delete admin %q: %w", name, ErrLastAdmin)
		}
		if err := b.Delete([]byte(name)); err != nil {
			return err
		}
		if err := deleteWhere(tx, bSessions, func(v []byte) bool { var x Session; return json.Unmarshal(v, &x) == nil && x.User == name }); err != nil {
			return err
		}
		return deleteWhere(tx, bTokens, func(v []byte) bool { var x APIToken; return json.Unmarshal(v, &x) == nil && x.User == name })
	})
}

func deleteWhere(tx *bolt.Tx, bucket []byte, match func(v []byte) bool) error {
	b, err := tx.CreateBucketIfNotExists(bucket)
	if err != nil {
		return err
	}
	var keys [][]byte
	b.ForEach(func(k, v []byte) error {
		if match(v) {
			keys = append(keys, append([]byte(nil), k...))
		}
		return nil
	})
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// Admin returns one account.
func (s *Store) Admin(name string) (AdminUser, error) {
	u, err := one[AdminUser](s, bAdmins, name)
	if err != nil {
		return u, fmt.Errorf("admin %q: %w", name, err)
	}
	return u, nil
}

// Admins returns every account, by name.
func (s *Store) Admins() ([]AdminUser, error) {
	us, err := list[AdminUser](s, bAdmins)
	sort.Slice(us, func(i, j int) bool { return us[i].Name < us[j].Name })
	return us, err
}

// PutSession stores a session under its hash.
func (s *Store) PutSession(x Session) error {
	return s.update(bSessions, func(b *bolt.Bucket) error { return put(b, x.Hash, x) })
}

// TouchSession sets the LastSeen of the session hash to at, if it still
// exists, in one transaction: a session deleted since the caller read it
// (logout, recovery, account deleted) stays deleted, and the answer is
// ErrNotFound. Writing back the copy read before would bring it back.
func (s *Store) TouchSession(hash string, at time.Time) error {
	return touch(s, bSessions, hash, func(x *Session) { x.LastSeen = at })
}

// touch applies fn to the record key of bucket if it exists, else
// returns ErrNotFound, in one transaction.
func touch[T any](s *Store, bucket []byte, key string, fn func(*T)) error {
	return s.update(bucket, func(b *bolt.Bucket) error {
		var x T
		if err := get(b, key, &x); err != nil {
			return err
		}
		fn(&x)
		return put(b, key, x)
	})
}

// Session returns the session with the given hash.
func (s *Store) Session(hash string) (Session, error) { return one[Session](s, bSessions, hash) }

// DeleteSession removes one session; a missing one is not an error.
func (s *Store) DeleteSession(hash string) error {
	return s.update(bSessions, func(b *bolt.Bucket) error { return b.Delete([]byte(hash)) })
}

// DeleteSessions removes every session of user (password change, recovery,
// role change) and every session that match reports expired.
func (s *Store) DeleteSessions(user string, expired func(Session) bool) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return deleteWhere(tx, bSessions, func(v []byte) bool {
			var x Session
			if json.Unmarshal(v, &x) != nil {
				return true
			}
			return (user != "" && x.User == user) || (expired != nil && expired(x))
		})
	})
}

// SetPasswordEndAccess sets the password hash of the account user (and its
// PasswordSet to at) and, in the same transaction, deletes every session
// of user but keepSession (a hash, or "" for none) and every API token of
// user; it returns how many tokens it deleted. A password change calls it:
// whoever knew the old password may have opened a session or made a token
// with it, and tokens do not expire. Either all of it is done or none: a
// failure leaves the old password beside the sessions and tokens it may
// have made, never the new one beside them. A missing account is
// ErrNotFound.
func (s *Store) SetPasswordEndAccess(user, hash string, at time.Time, keepSession string) (tokens int, err error) {
	return s.setPassword(user, hash, at, keepSession, false)
}

// RecoverAdmin is SetPasswordEndAccess for a password recovery: the
// account user also gets the admin role, and is created if it does not
// exist, and none of its sessions is kept.
func (s *Store) RecoverAdmin(user, hash string, at time.Time) (tokens int, err error) {
	return s.setPassword(user, hash, at, "", true)
}

func (s *Store) setPassword(user, hash string, at time.Time, keepSession string, recovery bool) (tokens int, err error) {
	err = s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bAdmins)
		if err != nil {
			return err
		}
		var u AdminUser
		switch err := get(b, user, &u); {
		case errors.Is(err, ErrNotFound) && recovery:
			u = AdminUser{Name: user, Created: at}
		case err != nil:
			return fmt.Errorf("admin %q: %w", user, err)
		}
		u.PasswordHash, u.PasswordSet = hash, at
		if recovery {
			u.Role = "admin"
		}
		if err := put(b, user, u); err != nil {
			return err
		}
		if s.afterPasswordPut != nil {
			if err := s.afterPasswordPut(); err != nil {
				return err
			}
		}
		tokens, err = endAccess(tx, user, keepSession)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("set the password of %q and end its sessions and API tokens: %w", user, err)
	}
	return tokens, nil
}

// endAccess deletes every session of user but keepSession and every API
// token of user in tx, and returns how many tokens it deleted.
func endAccess(tx *bolt.Tx, user, keepSession string) (tokens int, err error) {
	err = deleteWhere(tx, bSessions, func(v []byte) bool {
		var x Session
		return json.Unmarshal(v, &x) == nil && x.User == user && x.Hash != keepSession
	})
	if err != nil {
		return 0, err
	}
	err = deleteWhere(tx, bTokens, func(v []byte) bool {
		var x APIToken
		m := json.Unmarshal(v, &x) == nil && x.User == user
		if m {
			tokens++
		}
		return m
	})
	return tokens, err
}

// PutAPIToken stores a token under its hash.
func (s *Store) PutAPIToken(t APIToken) error {
	return s.update(bTokens, func(b *bolt.Bucket) error { return put(b, t.Hash, t) })
}

// TouchAPIToken sets the LastUsed of the token hash to at, if it still
// exists (as TouchSession: a deleted token stays deleted, ErrNotFound).
func (s *Store) TouchAPIToken(hash string, at time.Time) error {
	return touch(s, bTokens, hash, func(x *APIToken) { x.LastUsed = at })
}

// APIToken returns the token with the given hash.
func (s *Store) APIToken(hash string) (APIToken, error) { return one[APIToken](s, bTokens, hash) }

// APITokens returns every token.
func (s *Store) APITokens() ([]APIToken, error) { return list[APIToken](s, bTokens) }

// DeleteAPIToken removes the token with public id; user "" means any user.
func (s *Store) DeleteAPIToken(id, user string) error {
	found := false
	err := s.db.Update(func(tx *bolt.Tx) error {
		return deleteWhere(tx, bTokens, func(v []byte) bool {
			var x APIToken
			m := json.Unmarshal(v, &x) == nil && x.ID == id && (user == "" || x.User == user)
			found = found || m
			return m
		})
	})
	if err == nil && !found {
		err = fmt.Errorf("api token %q: %w", id, ErrNotFound)
	}
	return err
}

// ForwardRules returns the upstream forwarding rules, by topic. The upstream
// link reads them here; an empty list means nothing has been configured in
// the console. A record that does not decode as a rule (decodeRule) makes
// the rules unreadable (the gateway then holds the link: one of them may
// keep a topic local): the error, an *UnreadableRulesError, names the key
// of every such record, which DeleteForwardRule removes, and the rules that
// decode come with it, for
// display. Before, the error was the JSON decoder's alone, and the console,
// which lists the rules through this call, could show neither the rules
// nor which record to delete.
func (s *Store) ForwardRules() ([]ForwardRule, error) {
	var rs []ForwardRule
	var bad *UnreadableRulesError
	err := s.view(bRules, func(b *bolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			r, err := decodeRule(k, v)
			if err != nil {
				if bad == nil {
					bad = &UnreadableRulesError{Err: err}
				}
				bad.IDs = append(bad.IDs, string(k))
				return nil
			}
			rs = append(rs, r)
			return nil
		})
	})
	if errors.Is(err, ErrNotFound) {
		err = nil
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].Topic < rs[j].Topic })
	if err == nil && bad != nil {
		err = bad
	}
	return rs, err
}

// decodeRule decodes the forwarding rule record v stored under key k. A
// record whose id is not its key (empty, or another: written by hand, or
// copied) is not a rule either: the console deletes a rule by its id, so it
// could show such a record but never delete it, and the link would apply it
// for good.
func decodeRule(k, v []byte) (ForwardRule, error) {
	var r ForwardRule
	if err := json.Unmarshal(v, &r); err != nil {
		return r, err
	}
	if r.ID != string(k) {
		return r, fmt.Errorf("its id is %q, not its key %q", r.ID, k)
	}
	return r, nil
}

// UnreadableRulesError is ForwardRules' error for records of the forwarding
// rules that do not decode as a rule (the disk's corruption, or a record
// written by hand: see decodeRule): IDs are their keys, which
// DeleteForwardRule takes.
type UnreadableRulesError struct {
	IDs []string
	Err error // why the first record does not decode
}

func (e *UnreadableRulesError) Error() string {
	ids := make([]string, len(e.IDs))
	for i, id := range e.IDs {
		ids[i] = strconv.Quote(id)
	}
	return fmt.Sprintf("forwarding rule record %s in the store does not decode as a rule (%v): delete it (console: Upstream, forwarding rules; or DELETE /api/v1/upstream/rules/{id}), then add the rule again",
		strings.Join(ids, ", "), e.Err)
}

func (e *UnreadableRulesError) Unwrap() error { return e.Err }

// PutForwardRule creates or replaces the rule for r.Topic (one rule per
// topic filter) and returns it with its id.
func (s *Store) PutForwardRule(r ForwardRule) (ForwardRule, error) {
	err := s.update(bRules, func(b *bolt.Bucket) error {
		b.ForEach(func(k, v []byte) error {
			// Only a rule replaces: a record whose id is not its key
			// would have the new rule written under that id, beside it.
			if x, err := decodeRule(k, v); err == nil && x.Topic == r.Topic && r.ID == "" {
				r.ID = x.ID
			}
			return nil
		})
		if r.ID == "" {
			n, err := b.NextSequence()
			if err != nil {
				return err
			}
			r.ID = fmt.Sprintf("r%d", n)
		}
		return put(b, r.ID, r)
	})
	return r, err
}

// DeleteForwardRule removes a rule by id.
func (s *Store) DeleteForwardRule(id string) error {
	return s.update(bRules, func(b *bolt.Bucket) error {
		if b.Get([]byte(id)) == nil {
			return fmt.Errorf("forward rule %q: %w", id, ErrNotFound)
		}
		return b.Delete([]byte(id))
	})
}

// ExpectDevice records a device announced for the next pairing window.
func (s *Store) ExpectDevice(e ExpectedDevice) (ExpectedDevice, error) {
	err := s.update(bExpected, func(b *bolt.Bucket) error {
		n, err := b.NextSequence()
		if err != nil {
			return err
		}
		e.ID = fmt.Sprintf("e%d", n)
		return put(b, e.ID, e)
	})
	return e, err
}

// ExpectedDevices returns the announced devices, oldest first.
func (s *Store) ExpectedDevices() ([]ExpectedDevice, error) {
	es, err := list[ExpectedDevice](s, bExpected)
	sort.Slice(es, func(i, j int) bool { return es[i].Created.Before(es[j].Created) })
	return es, err
}

// DeleteExpectedDevice removes an announced device (withdrawn, expired or
// enrolled).
func (s *Store) DeleteExpectedDevice(id string) error {
	return s.update(bExpected, func(b *bolt.Bucket) error {
		if b.Get([]byte(id)) == nil {
			return fmt.Errorf("expected device %q: %w", id, ErrNotFound)
		}
		return b.Delete([]byte(id))
	})
}

// DeleteExpiredExpected deletes, in one transaction, the announced
// devices whose code has expired (Expires not after now), and returns
// them without their codes. An expired code is of no use (pairing refuses
// it), and it is the label's secret in clear: it is not left in the file.
// Nothing is written when nothing has expired.
func (s *Store) DeleteExpiredExpected(now time.Time) ([]ExpectedDevice, error) {
	var gone []ExpectedDevice
	err := s.db.Update(func(tx *bolt.Tx) error {
		err := deleteWhere(tx, bExpected, func(v []byte) bool {
			var e ExpectedDevice
			if json.Unmarshal(v, &e) != nil || now.Before(e.Expires) {
				return false
			}
			e.Code = ""
			gone = append(gone, e)
			return true
		})
		if err == nil && len(gone) == 0 {
			return errNotTaken // rolls back: no write
		}
		return err
	})
	if errors.Is(err, errNotTaken) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("delete expired setup codes: %w", err)
	}
	return gone, nil
}

// SetOptOut records whether the optional datum is switched off.
func (s *Store) SetOptOut(datum string, off bool) error {
	return s.update(bOptOut, func(b *bolt.Bucket) error {
		if off {
			return b.Put([]byte(datum), []byte("1"))
		}
		return b.Delete([]byte(datum))
	})
}

// OptOuts returns the data switched off.
func (s *Store) OptOuts() (map[string]bool, error) {
	m := map[string]bool{}
	err := s.view(bOptOut, func(b *bolt.Bucket) error {
		return b.ForEach(func(k, _ []byte) error { m[string(k)] = true; return nil })
	})
	if errors.Is(err, ErrNotFound) {
		err = nil
	}
	return m, err
}
