package console

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/subtle"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// argon2id parameters: OWASP's minimum configuration (19 MiB, t=2, p=1),
// the most a 128 MiB router can afford per login. The same as the
// gateway's device secrets.
const (
	argonTime    = 2
	argonMemory  = 19 * 1024
	argonThreads = 1
	argonKeyLen  = 32
	// MinPasswordLen is the shortest password accepted, in characters.
	MinPasswordLen = 12
	// MaxPasswordLen bounds the input to the hash.
	MaxPasswordLen = 256
)

// hasher bounds concurrent argon2id runs so that a burst of logins cannot
// exhaust a small router's memory (19 MiB each). Its slots are the
// gateway's when it has them (Argon2Slots).
type hasher struct {
	slots Argon2Slots
	// own, when slots are the box's (shared with device secret checks),
	// is taken first: the console holds at most one of the shared slots,
	// so that logins from the LAN, which wait for a slot as long as their
	// request lasts, cannot keep every device secret check waiting until
	// it is refused as busy.
	own chanSlots
}

// newHasher bounds the runs to n of the console's own.
func newHasher(n int) *hasher { return &hasher{slots: make(chanSlots, n)} }

// chanSlots is the console's own bound, for a Gateway without Argon2Slots.
type chanSlots chan struct{}

func (c chanSlots) AcquireArgon2(ctx context.Context) error {
	select {
	case c <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c chanSlots) ReleaseArgon2() { <-c }

func (h *hasher) acquire(ctx context.Context) error {
	if h.own != nil {
		if err := h.own.AcquireArgon2(ctx); err != nil {
			return err
		}
	}
	if err := h.slots.AcquireArgon2(ctx); err != nil {
		if h.own != nil {
			h.own.ReleaseArgon2()
		}
		return err
	}
	return nil
}

func (h *hasher) release() {
	h.slots.ReleaseArgon2()
	if h.own != nil {
		h.own.ReleaseArgon2()
	}
}

// hash returns the PHC-style argon2id encoding of password with a fresh
// 16-byte salt.
func (h *hasher) hash(ctx context.Context, password string) (string, error) {
	if err := h.acquire(ctx); err != nil {
		return "", err
	}
	defer h.release()
	salt := make([]byte, 16)
	rand.Read(salt)
	k := argon2.IDKey([]byte(password), salt, argonTime, argonMemory, argonThreads, argonKeyLen)
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", argonMemory, argonTime, argonThreads,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(k)), nil
}

// dummyHash is checked when the user does not exist, so that an unknown
// name costs the same time as a wrong password.
const dummyHash = "$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

// verify checks password against an encoding made by hash. Parameters are
// read from the encoding but bounded, so a tampered store cannot make a
// login allocate gigabytes.
func (h *hasher) verify(ctx context.Context, encoded, password string) (bool, error) {
	m, t, p, salt, want, err := parseArgon2id(encoded)
	if err != nil {
		return false, err
	}
	if err := h.acquire(ctx); err != nil {
		return false, err
	}
	defer h.release()
	got := argon2.IDKey([]byte(password), salt, t, m, p, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}

var errBadHash = errors.New("stored password hash is not argon2id in the expected form")

func parseArgon2id(encoded string) (m, t uint32, p uint8, salt, key []byte, err error) {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" || parts[2] != "v=19" {
		return 0, 0, 0, nil, nil, errBadHash
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &p); err != nil {
		return 0, 0, 0, nil, nil, errBadHash
	}
	if m < 8 || m > 64*1024 || t < 1 || t > 10 || p < 1 || p > 4 {
		return 0, 0, 0, nil, nil, errBadHash
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[4])
	key, err2 := base64.RawStdEncoding.DecodeString(parts[5])
	if err1 != nil || err2 != nil || len(salt) < 8 || len(key) < 16 || len(key) > 64 {
		return 0, 0, 0, nil, nil, errBadHash
	}
	return m, t, p, salt, key, nil
}

//go:embed common-passwords.txt
var commonPasswordsFile string

// commonWords is the refused list, normalised.
var commonWords = func() map[string]bool {
	m := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(commonPasswordsFile))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		m[normalise(l)] = true
	}
	return m
}()

var leet = strings.NewReplacer("0", "o", "1", "l", "!", "i", "3", "e", "4", "a", "5", "s", "7", "t", "@", "a", "$", "s", "|", "l", "+", "t")

// leetI reads 1 as i (4l1ce) where leet reads it as l (p4ssw0rd1).
var leetI = strings.NewReplacer("0", "o", "1", "i", "!", "i", "3", "e", "4", "a", "5", "s", "7", "t", "@", "a", "$", "s", "|", "l", "+", "t")

// normalise lower-cases, undoes letter substitutions and strips what is not
// a letter from both ends, so Passw0rd!2024 and password compare equal.
func normalise(s string) string { return normaliseWith(leet, s) }

func normaliseWith(leet *strings.Replacer, s string) string {
	s = strings.ToLower(s)
	core := strings.TrimFunc(s, func(r rune) bool { return !unicode.IsLetter(r) })
	if core == "" {
		return ""
	}
	core = leet.Replace(core)
	return strings.TrimFunc(core, func(r rune) bool { return !unicode.IsLetter(r) })
}

// keyboard rows and sequences people walk along.
var sequences = []string{"qwertyuiopasdfghjklzxcvbnm", "qwertzuiopasdfghjklyxcvbnm", "azertyuiopqsdfghjklmwxcvbn",
	"abcdefghijklmnopqrstuvwxyz", "01234567890", "09876543210", "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p"}

// CheckPassword returns nil if password is acceptable for user, or an
// error saying what to change.
func CheckPassword(user, password string) error {
	n := utf8.RuneCountInString(password)
	switch {
	case !utf8.ValidString(password):
		return errors.New("password is not valid UTF-8")
	case n < MinPasswordLen:
		return fmt.Errorf("password too short: use at least %d characters (a few unrelated words work well)", MinPasswordLen)
	case len(password) > MaxPasswordLen:
		return fmt.Errorf("password too long: at most %d bytes", MaxPasswordLen)
	}
	lower := strings.ToLower(password)
	if u := strings.ToLower(strings.TrimSpace(user)); len(u) >= 3 && (strings.Contains(lower, u) || strings.Contains(leet.Replace(lower), u) || strings.Contains(leetI.Replace(lower), u)) {
		return errors.New("password contains the user name: choose one that does not")
	}
	distinct := map[rune]bool{}
	for _, r := range password {
		distinct[r] = true
	}
	if len(distinct) < 5 {
		return errors.New("password repeats too few characters: use at least 5 different ones")
	}
	for _, seq := range sequences {
		if strings.Contains(seq, lower) || strings.Contains(reverse(seq), lower) {
			return errors.New("password is a keyboard or alphabet sequence: choose another")
		}
	}
	core := normalise(password)
	if core == "" {
		return errors.New("password has no letters between digits and symbols: common patterns like dates and PINs are refused")
	}
	coreI := normaliseWith(leetI, password)
	if commonWords[core] || commonWords[coreI] || repeatsCommon(core) || madeOfCommon(lettersOnly(core)) ||
		madeOfCommon(lettersOnly(coreI)) || madeOfCommon(lettersOnly(strings.ToLower(password))) {
		return errors.New("password is too common (it is, or is built from, a frequently used password): choose another")
	}
	return nil
}

// repeatsCommon reports whether s is one short unit or common word
// repeated (abcabcabcabc, passwordpassword).
func repeatsCommon(s string) bool {
	for l := 1; l <= len(s)/2; l++ {
		if len(s)%l != 0 {
			continue
		}
		unit := s[:l]
		if strings.Repeat(unit, len(s)/l) == s && (l <= 4 || commonWords[unit]) {
			return true
		}
	}
	return false
}

func lettersOnly(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsLetter(r) {
			return r
		}
		return -1
	}, s)
}

// madeOfCommon reports whether s is entirely a concatenation of refused
// words (letmeinletmein, summerwinter, adminpassword).
func madeOfCommon(s string) bool {
	if s == "" {
		return false
	}
	ok := make([]bool, len(s)+1) // ok[i]: s[:i] splits into common words
	ok[0] = true
	for i := 1; i <= len(s); i++ {
		for j := max(0, i-20); j <= i-3 && !ok[i]; j++ {
			ok[i] = ok[j] && commonWords[s[j:i]]
		}
	}
	return ok[len(s)]
}

func reverse(s string) string {
	b := []byte(s)
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return string(b)
}
