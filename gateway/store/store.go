// Package store is the gateway's embedded runtime state: devices, credential
// metadata, revocations and the audit log, in one bbolt file in the state
// directory. bbolt is pure Go, and every update is one fsynced copy-on-write
// transaction, so a power cut or kill -9 leaves either the old or the new
// state, never a torn one. The audit log keeps its newest events only
// (DefaultAuditRetention); the record of a renewed certificate is deleted
// once the certificate has expired (PruneRetiredCerts).
//
// The store holds no secrets: PSKs are derived from a key in the PKI's
// directory, secrets are stored as argon2id hashes, private keys live in
// files of their own.
package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bDevices = []byte("devices") // id → Device
	bNames   = []byte("names")   // name → id (active devices only)
	bPSK     = []byte("psk")     // psk identity → id
	bCerts   = []byte("certs")   // serial (hex) → Cert
	bAudit   = []byte("audit")   // seq (big endian) → Event
	bMeta    = []byte("meta")    // small named values
	// bRetired indexes the certificates renewed (RetireAt set) by their
	// end: NotAfter (Unix seconds, big endian) + serial → nothing, so
	// that those expired are found, oldest first, without reading the
	// others (PruneRetiredCerts).
	bRetired = []byte("certs_retired")
	buckets  = [][]byte{bDevices, bNames, bPSK, bCerts, bAudit, bMeta, bRetired}
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("not found")

// ErrNameTaken is returned when an active device already has the name.
var ErrNameTaken = errors.New("name already used by an active device")

// Store is an open state database.
type Store struct {
	db *bolt.DB
	// Answers about devices kept in memory: a PSK handshake looks its
	// identity up (reading and decoding the record from the file was
	// about 6 % of the gateway's CPU per handshake), and a firmware
	// transfer looks its device up for every block.
	psk, byID deviceCache
	// auditKeep is how many audit events are kept (AuditRetention).
	auditKeep uint64
	// afterPasswordPut, if set (tests), runs in the transaction of
	// SetPasswordEndAccess or RecoverAdmin between writing the password
	// and ending the sessions and tokens; an error it returns fails the
	// transaction.
	afterPasswordPut func() error
}

// DefaultAuditRetention is how many audit events a store keeps: the
// newest, each event written deleting the oldest beyond it. Anyone on the
// LAN can make the gateway audit something (a refused pairing session, a
// failed console login), so a log without a bound would fill the flash;
// bounded by count, not age, a flood replaces old events but never grows
// the file. An event is 150 to 400 bytes of JSON, so 10,000 take 2 to
// 4 MB of the state file, which a router's flash can spare, and bbolt
// reuses the pages the deleted events free: the file stops growing once
// it holds them. That is years of what operators and devices do (adds,
// revocations, windows, logins, reloads), and still days of it under a
// refusal flood, which the gateway audits in summaries, at most one per
// reason per minute (the metrics count every refusal).
const DefaultAuditRetention = 10000

// Option tunes a Store.
type Option func(*Store)

// AuditRetention keeps the newest n audit events (DefaultAuditRetention if
// n < 1).
func AuditRetention(n int) Option {
	return func(s *Store) {
		if n > 0 {
			s.auditKeep = uint64(n)
		}
	}
}

// deviceCache keeps a lookup's answers in memory. Every write that can
// change an answer (updateDevices) empties it once the write has
// committed, and an answer read from the file is kept only if no such
// write committed while it was read (gen), so a lookup that starts after
// Revoke or UpdateDevice has returned sees their result.
type deviceCache struct {
	mu  sync.Mutex
	gen uint64 // committed writes to devices
	m   map[string]Device
	// afterRead, if set (tests), runs between reading an answer from the
	// file and keeping it.
	afterRead func()
}

// maxDeviceCache bounds each cache (about 300 bytes an entry); when full
// it is emptied, which only costs the next lookups a read from the file.
const maxDeviceCache = 8192

// get answers key from memory, or from load (the file) and keeps that.
func (c *deviceCache) get(key string, load func(string) (Device, error)) (Device, error) {
	c.mu.Lock()
	cached, ok := c.m[key]
	gen := c.gen
	c.mu.Unlock()
	if ok {
		return cached, nil
	}
	d, err := load(key)
	if err != nil {
		return Device{}, err
	}
	if c.afterRead != nil {
		c.afterRead()
	}
	c.mu.Lock()
	if c.gen == gen { // no write committed since the read began
		if c.m == nil || len(c.m) >= maxDeviceCache {
			c.m = make(map[string]Device)
		}
		c.m[key] = d
	}
	c.mu.Unlock()
	return d, nil
}

// invalidate empties the cache after a write to devices committed.
func (c *deviceCache) invalidate() {
	c.mu.Lock()
	c.gen++
	clear(c.m)
	c.mu.Unlock()
}

// updateDevices runs fn in a write transaction that may change devices or
// PSK identities, then empties the device caches.
func (s *Store) updateDevices(fn func(tx *bolt.Tx) error) error {
	err := s.db.Update(fn)
	s.psk.invalidate()
	s.byID.invalidate()
	return err
}

// Open opens or creates the store at path (mode 0600). It fails fast if
// another bastiond holds the file. An audit log longer than the retention
// (written by a version that kept every event, or with a larger
// retention) is cut to it here.
func Open(path string, opts ...Option) (*Store, error) {
	s := &Store{auditKeep: DefaultAuditRetention}
	for _, o := range opts {
		o(s)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: locked by another process (is bastiond already running with this state directory?)", path)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	var more bool
	err = db.Update(func(tx *bolt.Tx) error {
		// A store written by a version without the index of renewed
		// certificates gets it built once, from their records.
		indexRetired := tx.Bucket(bRetired) == nil
		for _, b := range buckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		if indexRetired {
			if err := buildRetiredIndex(tx); err != nil {
				return err
			}
		}
		more, err = dropOldAudit(tx.Bucket(bAudit), s.auditKeep)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: create buckets, index renewed certificates, cut the audit log: %w", path, err)
	}
	for more {
		err = db.Update(func(tx *bolt.Tx) (err error) {
			more, err = dropOldAudit(tx.Bucket(bAudit), s.auditKeep)
			return err
		})
		if err != nil {
			db.Close()
			return nil, fmt.Errorf("open store %s: cut the audit log to its newest %d events: %w", path, s.auditKeep, err)
		}
	}
	s.db = db
	return s, nil
}

// Close closes the database file.
func (s *Store) Close() error { return s.db.Close() }

// Check verifies the file's internal consistency (used after crashes and in
// tests).
func (s *Store) Check() error {
	return s.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			return fmt.Errorf("store consistency: %w", err)
		}
		return nil
	})
}

// Device is one device the gateway knows.
type Device struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Auth    string `json:"auth"` // psk, cert or secret
	Vendor  string `json:"vendor,omitempty"`
	Model   string `json:"model,omitempty"`
	Version string `json:"version,omitempty"` // firmware version the device reports
	// PSKIdentity is set for PSK devices; the key is derived, not stored.
	PSKIdentity string `json:"psk_identity,omitempty"`
	// SecretHash is an argon2id hash for MQTT secret login, if any.
	SecretHash string    `json:"secret_hash,omitempty"`
	Created    time.Time `json:"created"`
	LastSeen   time.Time `json:"last_seen,omitzero"`
	Revoked    bool      `json:"revoked,omitempty"`
	RevokedAt  time.Time `json:"revoked_at,omitzero"`
}

// Cert is the metadata of a certificate the CA issued.
type Cert struct {
	Serial   string    `json:"serial"` // hex
	Device   string    `json:"device"`
	NotAfter time.Time `json:"not_after"`
	Revoked  bool      `json:"revoked,omitempty"`
	// RetireAt is set when the certificate was renewed: it is refused
	// from then on.
	RetireAt time.Time `json:"retire_at,omitzero"`
}

func put(b *bolt.Bucket, k string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(k), data)
}

func get(b *bolt.Bucket, k string, v any) error {
	data := b.Get([]byte(k))
	if data == nil {
		return ErrNotFound
	}
	return json.Unmarshal(data, v)
}

// AddDevice creates d, refusing a name an active device already has.
func (s *Store) AddDevice(d Device) error {
	return s.updateDevices(func(tx *bolt.Tx) error {
		if tx.Bucket(bDevices).Get([]byte(d.ID)) != nil {
			return fmt.Errorf("add device %s: id exists", d.ID)
		}
		if tx.Bucket(bNames).Get([]byte(d.Name)) != nil {
			return fmt.Errorf("add device %q: %w", d.Name, ErrNameTaken)
		}
		if d.PSKIdentity != "" {
			if err := tx.Bucket(bPSK).Put([]byte(d.PSKIdentity), []byte(d.ID)); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bNames).Put([]byte(d.Name), []byte(d.ID)); err != nil {
			return err
		}
		return put(tx.Bucket(bDevices), d.ID, d)
	})
}

// UpdateDevice applies fn to the stored device id and saves the result. The
// id and revocation state cannot be changed this way.
func (s *Store) UpdateDevice(id string, fn func(*Device) error) (Device, error) {
	var out Device
	err := s.updateDevices(func(tx *bolt.Tx) error {
		var d Device
		if err := get(tx.Bucket(bDevices), id, &d); err != nil {
			return fmt.Errorf("device %s: %w", id, err)
		}
		old := d
		if err := fn(&d); err != nil {
			return err
		}
		d.ID, d.Revoked, d.RevokedAt = old.ID, old.Revoked, old.RevokedAt
		if d.Name != old.Name {
			names := tx.Bucket(bNames)
			if names.Get([]byte(d.Name)) != nil {
				return fmt.Errorf("rename device %s to %q: %w", id, d.Name, ErrNameTaken)
			}
			if !d.Revoked {
				if err := names.Delete([]byte(old.Name)); err != nil {
					return err
				}
				if err := names.Put([]byte(d.Name), []byte(id)); err != nil {
					return err
				}
			}
		}
		out = d
		return put(tx.Bucket(bDevices), id, d)
	})
	return out, err
}

// Device returns the device with id, as the last committed write left it
// (from memory if it was looked up since).
func (s *Store) Device(id string) (Device, error) {
	return s.byID.get(id, s.device)
}

func (s *Store) device(id string) (Device, error) {
	var d Device
	err := s.db.View(func(tx *bolt.Tx) error { return get(tx.Bucket(bDevices), id, &d) })
	if err != nil {
		return Device{}, fmt.Errorf("device %s: %w", id, err)
	}
	return d, nil
}

// DeviceByName returns the active device called name.
func (s *Store) DeviceByName(name string) (Device, error) {
	var d Device
	err := s.db.View(func(tx *bolt.Tx) error {
		id := tx.Bucket(bNames).Get([]byte(name))
		if id == nil {
			return ErrNotFound
		}
		return get(tx.Bucket(bDevices), string(id), &d)
	})
	if err != nil {
		return Device{}, fmt.Errorf("device named %q: %w", name, err)
	}
	return d, nil
}

// DeviceByPSKIdentity returns the device that owns a PSK identity, as the
// last committed write left it (from memory if it was looked up since).
func (s *Store) DeviceByPSKIdentity(identity string) (Device, error) {
	return s.psk.get(identity, s.deviceByPSKIdentity)
}

func (s *Store) deviceByPSKIdentity(identity string) (Device, error) {
	var d Device
	err := s.db.View(func(tx *bolt.Tx) error {
		id := tx.Bucket(bPSK).Get([]byte(identity))
		if id == nil {
			return ErrNotFound
		}
		return get(tx.Bucket(bDevices), string(id), &d)
	})
	if err != nil {
		return Device{}, fmt.Errorf("psk identity: %w", err)
	}
	return d, nil
}

// Devices returns every device, revoked ones included.
func (s *Store) Devices() ([]Device, error) {
	var ds []Device
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bDevices).ForEach(func(_, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return err
			}
			ds = append(ds, d)
			return nil
		})
	})
	return ds, err
}

// RecordCert remembers a certificate issued to a device.
func (s *Store) RecordCert(c Cert) error {
	return s.db.Update(func(tx *bolt.Tx) error { return put(tx.Bucket(bCerts), c.Serial, c) })
}

// RecordRenewal records, in one transaction, that old was renewed (its
// RetireAt set) and the certificate that replaces it. In the same
// transaction it deletes the records of up to maxCertPrunes renewed
// certificates expired before now (PruneRetiredCerts), so that a device
// renewing every hour leaves no more records than its certificates'
// validity holds.
func (s *Store) RecordRenewal(old, renewed Cert, now time.Time) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bCerts)
		var cur Cert
		if err := get(b, old.Serial, &cur); err == nil {
			cur.RetireAt = old.RetireAt
			old = cur
		}
		if err := put(b, old.Serial, old); err != nil {
			return fmt.Errorf("record renewal of %s: %w", old.Serial, err)
		}
		if err := tx.Bucket(bRetired).Put(retiredKey(old), nil); err != nil {
			return fmt.Errorf("record renewal of %s: index it: %w", old.Serial, err)
		}
		if err := put(b, renewed.Serial, renewed); err != nil {
			return fmt.Errorf("record renewed certificate %s: %w", renewed.Serial, err)
		}
		_, _, err := pruneRetired(tx, now)
		return err
	})
}

// maxCertPrunes bounds the records one transaction deletes.
const maxCertPrunes = 1000

// PruneRetiredCerts deletes the records of up to maxCertPrunes renewed
// certificates (RetireAt set) whose NotAfter is before now, oldest first,
// and reports how many it deleted and whether more are left. Such a
// certificate needs no record to stay refused: every check of a device
// certificate (pki.CA.VerifyDevice's chain check at the handshake,
// CertValid on open sessions, renewal) refuses it as expired. A
// certificate not renewed keeps its record however old, so that the
// console still shows a device's expired certificate. Nothing is written
// when nothing is deleted.
func (s *Store) PruneRetiredCerts(now time.Time) (n int, more bool, err error) {
	err = s.db.Update(func(tx *bolt.Tx) error {
		n, more, err = pruneRetired(tx, now)
		if err == nil && n == 0 {
			return errNotTaken // rolls back: no write
		}
		return err
	})
	if errors.Is(err, errNotTaken) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("prune expired renewed certificates: %w", err)
	}
	return n, more, nil
}

// retiredKey is c's key in bRetired.
func retiredKey(c Cert) []byte {
	return append(binary.BigEndian.AppendUint64(nil, uint64(c.NotAfter.Unix())), c.Serial...)
}

// pruneRetired deletes, in tx, the records of up to maxCertPrunes renewed
// certificates whose NotAfter is before now.
func pruneRetired(tx *bolt.Tx, now time.Time) (n int, more bool, err error) {
	certs := tx.Bucket(bCerts)
	c := tx.Bucket(bRetired).Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		// Whole seconds: a certificate's NotAfter has no fraction, so
		// one ending in now's second is not expired yet, and is kept.
		if len(k) < 8 || int64(binary.BigEndian.Uint64(k)) >= now.Unix() {
			return n, false, nil
		}
		if n == maxCertPrunes {
			return n, true, nil
		}
		serial := k[8:]
		if err := certs.Delete(serial); err != nil {
			return n, false, fmt.Errorf("delete expired renewed certificate %s: %w", serial, err)
		}
		if err := c.Delete(); err != nil {
			return n, false, fmt.Errorf("delete expired renewed certificate %s from the index: %w", serial, err)
		}
		n++
	}
	return n, false, nil
}

// buildRetiredIndex indexes, in tx, every renewed certificate's record.
func buildRetiredIndex(tx *bolt.Tx) error {
	idx := tx.Bucket(bRetired)
	return tx.Bucket(bCerts).ForEach(func(_, v []byte) error {
		var c Cert
		if err := json.Unmarshal(v, &c); err != nil {
			return err
		}
		if c.RetireAt.IsZero() {
			return nil
		}
		return idx.Put(retiredKey(c), nil)
	})
}

// Certs returns every issued certificate's metadata.
func (s *Store) Certs() ([]Cert, error) {
	var cs []Cert
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bCerts).ForEach(func(_, v []byte) error {
			var c Cert
			if err := json.Unmarshal(v, &c); err != nil {
				return err
			}
			cs = append(cs, c)
			return nil
		})
	})
	return cs, err
}

// Revoke marks the device and every certificate issued to it revoked, frees
// its name and PSK identity, and returns the device as it now is.
func (s *Store) Revoke(id string, at time.Time) (Device, error) {
	var d Device
	err := s.updateDevices(func(tx *bolt.Tx) error {
		if err := get(tx.Bucket(bDevices), id, &d); err != nil {
			return fmt.Errorf("revoke device %s: %w", id, err)
		}
		if d.Revoked {
			return nil
		}
		d.Revoked, d.RevokedAt = true, at
		if err := tx.Bucket(bNames).Delete([]byte(d.Name)); err != nil {
			return err
		}
		certs := tx.Bucket(bCerts)
		err := certs.ForEach(func(k, v []byte) error {
			var c Cert
			if err := json.Unmarshal(v, &c); err != nil {
				return err
			}
			if c.Device == id && !c.Revoked {
				c.Revoked = true
				return put(certs, string(k), c)
			}
			return nil
		})
		if err != nil {
			return err
		}
		return put(tx.Bucket(bDevices), id, d)
	})
	return d, err
}

// Event is one audit-log entry: who did what, when, from where.
type Event struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`  // admin user, "bastionctl", "button", "device:<id>", "system"
	Action string    `json:"action"` // e.g. device.add, device.revoke, pairing.open
	Target string    `json:"target,omitempty"`
	Remote string    `json:"remote,omitempty"`
	Detail string    `json:"detail,omitempty"`
}

// Audit appends e and returns its sequence number. In the same
// transaction it deletes the events that are no longer among the newest
// the store keeps (AuditRetention): one, once the log is full. Sequence
// numbers go on from the newest ever written; the oldest kept is the
// lowest left.
func (s *Store) Audit(e Event) (uint64, error) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bAudit)
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		e.Seq = seq
		data, err := json.Marshal(e)
		if err != nil {
			return err
		}
		if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), data); err != nil {
			return err
		}
		_, err = dropOldAudit(b, s.auditKeep)
		return err
	})
	return e.Seq, err
}

// maxAuditDrops bounds the events one transaction deletes, so that
// cutting a long log (Open) is a series of transactions of bounded size,
// not one that holds the whole log's pages in memory.
const maxAuditDrops = 10000

// dropOldAudit deletes the oldest events of b while their seq is not
// among the newest keep (seq <= newest-keep), at most maxAuditDrops; more
// reports that some are left. Keys are big-endian seqs, so the oldest is
// the first: a full log drops one event per event written.
func dropOldAudit(b *bolt.Bucket, keep uint64) (more bool, err error) {
	newest := b.Sequence()
	if newest <= keep {
		return false, nil
	}
	last := newest - keep // the newest seq to drop
	c := b.Cursor()
	for n := 0; ; n++ {
		k, _ := c.First()
		if k == nil || len(k) != 8 || binary.BigEndian.Uint64(k) > last {
			return false, nil
		}
		if n == maxAuditDrops {
			return true, nil
		}
		if err := c.Delete(); err != nil {
			return false, fmt.Errorf("drop audit event %d: %w", binary.BigEndian.Uint64(k), err)
		}
	}
}

// AuditLog returns up to limit events, newest first, with Seq < before (0 =
// from the newest).
func (s *Store) AuditLog(limit int, before uint64) ([]Event, error) {
	var es []Event
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bAudit).Cursor()
		var k, v []byte
		if before == 0 {
			k, v = c.Last()
		} else {
			if k, _ = c.Seek(binary.BigEndian.AppendUint64(nil, before)); k == nil {
				k, v = c.Last() // every key is below before
			} else {
				k, v = c.Prev()
			}
		}
		for ; k != nil && len(es) < limit; k, v = c.Prev() {
			var e Event
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			es = append(es, e)
		}
		return nil
	})
	return es, err
}

// Meta returns a small named value, or ErrNotFound.
func (s *Store) Meta(key string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bMeta).Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		out = append([]byte(nil), v...)
		return nil
	})
	return out, err
}

// TakeMeta deletes the value of key if spend reports it may be spent,
// and reports whether it did, in one transaction: of several callers
// presenting a one-time code at once, exactly one spends it. A missing
// key is not spent (false, nil). Nothing is written when nothing is
// spent, so wrong codes do not wear the flash.
func (s *Store) TakeMeta(key string, spend func(v []byte) bool) (bool, error) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bMeta)
		v := b.Get([]byte(key))
		if v == nil || !spend(v) {
			return errNotTaken // rolls back: no write
		}
		return b.Delete([]byte(key))
	})
	if errors.Is(err, errNotTaken) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("spend %s: %w", key, err)
	}
	return true, nil
}

var errNotTaken = errors.New("not taken")

// SetMeta stores a small named value; nil deletes it.
func (s *Store) SetMeta(key string, v []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if v == nil {
			return tx.Bucket(bMeta).Delete([]byte(key))
		}
		return tx.Bucket(bMeta).Put([]byte(key), v)
	})
}
