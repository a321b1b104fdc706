package spake2plus

import (
	"bufio"
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"math/big"
	"os"
	"strings"
	"testing"

	"filippo.io/nistec"
	"github.com/google/go-cmp/cmp"
)

const vectorFile = "testdata/rfc9383-p256-sha256-hkdf-sha256-hmac-sha256.txt"

// vector reads the RFC 9383 Appendix C vector from testdata.
func vector(t testing.TB) map[string]string {
	t.Helper()
	f, err := os.Open(vectorFile)
	if err != nil {
		t.Fatalf("open test vector: %v", err)
	}
	defer f.Close()
	v := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, val, ok := strings.Cut(line, " = ")
		if !ok {
			t.Fatalf("test vector line %q: no ' = '", line)
		}
		v[k] = val
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return v
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("hex %q: %v", s, err)
	}
	return b
}

func vectorContext(v map[string]string) Context {
	return Context{Context: []byte(v["context"]), ProverID: []byte(v["idProver"]), VerifierID: []byte(v["idVerifier"])}
}

func hexEq(t *testing.T, name string, want string, got []byte) {
	t.Helper()
	if diff := cmp.Diff(want, hex.EncodeToString(got)); diff != "" {
		t.Errorf("%s mismatch (-want +got):\n%s", name, diff)
	}
}

func TestRFC9383VectorP256SHA256(t *testing.T) {
	v := vector(t)
	c := vectorContext(v)
	secret, err := NewProverSecret(unhex(t, v["w0"]), unhex(t, v["w1"]))
	if err != nil {
		t.Fatal(err)
	}
	rec := secret.VerifierRecord()
	hexEq(t, "L", v["L"], rec.L())

	var x, y scalar
	copy(x[:], unhex(t, v["x"]))
	copy(y[:], unhex(t, v["y"]))

	prover, shareP, err := newProverWithScalar(c, secret, x)
	if err != nil {
		t.Fatal(err)
	}
	hexEq(t, "shareP", v["shareP"], shareP)

	verifier, shareV, confirmV, err := newVerifierWithScalar(c, rec, shareP, y)
	if err != nil {
		t.Fatal(err)
	}
	hexEq(t, "shareV", v["shareV"], shareV)
	hexEq(t, "confirmV", v["confirmV"], confirmV)

	confirmP, proverKey, err := prover.Finish(shareV, confirmV)
	if err != nil {
		t.Fatal(err)
	}
	hexEq(t, "confirmP", v["confirmP"], confirmP)
	hexEq(t, "K_shared (prover)", v["K_shared"], proverKey)

	verifierKey, err := verifier.Finish(confirmP)
	if err != nil {
		t.Fatal(err)
	}
	hexEq(t, "K_shared (verifier)", v["K_shared"], verifierKey)

	// The intermediate values, from the vector's own Z and V.
	var w0 scalar
	copy(w0[:], unhex(t, v["w0"]))
	tt := transcript(c, shareP, shareV, unhex(t, v["Z"]), unhex(t, v["V"]), w0)
	hexEq(t, "TT", v["TT"], tt)
	k := schedule(tt)
	hexEq(t, "K_main", v["K_main"], k.main)
	hexEq(t, "K_confirmP", v["K_confirmP"], k.confirmP)
	hexEq(t, "K_confirmV", v["K_confirmV"], k.confirmV)
	hexEq(t, "K_shared", v["K_shared"], k.shared)

	// And Z, V as each side computes them.
	Y, _ := decodeShare(shareV)
	base, err := unmask(Y, w0, pointN())
	if err != nil {
		t.Fatal(err)
	}
	hexEq(t, "Z (prover)", v["Z"], mul(base, x).Bytes())
	hexEq(t, "V (prover)", v["V"], mul(base, secret.w1).Bytes())
	X, _ := decodeShare(shareP)
	baseV, err := unmask(X, w0, pointM())
	if err != nil {
		t.Fatal(err)
	}
	L, _ := decodeShare(rec.L())
	hexEq(t, "Z (verifier)", v["Z"], mul(baseV, y).Bytes())
	hexEq(t, "V (verifier)", v["V"], mul(L, y).Bytes())
}

func TestConstantsMatchRFC(t *testing.T) {
	// RFC 9383 section 4 prints M and N compressed.
	hexEq(t, "M", "02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f", pointM().BytesCompressed())
	hexEq(t, "N", "03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49", pointN().BytesCompressed())
}

var testCtx = Context{Context: []byte("bastion test v1"), ProverID: []byte("gateway"), VerifierID: []byte("device-1")}

var fastKDF = KDFParams{N: 1024, R: 8, P: 1}

func register(t testing.TB, code string, c Context) *ProverSecret {
	t.Helper()
	s, err := Register([]byte(code), []byte("0123456789abcdef"), c, fastKDF)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// run carries every message as bytes, as an application would.
func run(t *testing.T, ps *ProverSecret, pc Context, rec *VerifierRecord, vc Context) (pk, vk []byte, perr, verr error) {
	t.Helper()
	prover, shareP, err := NewProver(pc, ps, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	verifier, shareV, confirmV, err := NewVerifier(vc, rec, shareP, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	confirmP, pk, perr := prover.Finish(shareV, confirmV)
	if perr != nil {
		// The prover refuses and sends nothing; the verifier sees garbage
		// or nothing and must refuse too.
		confirmP = make([]byte, ConfirmSize)
	}
	vk, verr = verifier.Finish(confirmP)
	return pk, vk, perr, verr
}

func TestRoundTrip(t *testing.T) {
	s := register(t, "12345-67890", testCtx)
	pk, vk, perr, verr := run(t, s, testCtx, s.VerifierRecord(), testCtx)
	if perr != nil || verr != nil {
		t.Fatalf("prover err %v, verifier err %v", perr, verr)
	}
	if !bytes.Equal(pk, vk) || len(pk) != SharedKeySize {
		t.Fatalf("keys differ or wrong size: %x vs %x", pk, vk)
	}
	// Two runs with the same code give different keys (fresh x, y).
	pk2, _, _, _ := run(t, s, testCtx, s.VerifierRecord(), testCtx)
	if bytes.Equal(pk, pk2) {
		t.Fatal("two runs produced the same shared key")
	}
}

func TestMismatchRefused(t *testing.T) {
	right := register(t, "12345-67890", testCtx)
	other := testCtx
	other.VerifierID = []byte("device-2")
	otherContext := testCtx
	otherContext.Context = []byte("bastion test v2")
	cases := map[string]struct {
		prover *ProverSecret
		pc, vc Context
	}{
		"wrong code":           {register(t, "12345-67891", testCtx), testCtx, testCtx},
		"wrong verifier id":    {right, other, testCtx},
		"wrong context string": {right, testCtx, otherContext},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, _, perr, verr := run(t, tc.prover, tc.pc, right.VerifierRecord(), tc.vc)
			if !errors.Is(perr, ErrConfirmation) {
				t.Errorf("prover: got %v, want ErrConfirmation", perr)
			}
			if !errors.Is(verr, ErrConfirmation) {
				t.Errorf("verifier: got %v, want ErrConfirmation", verr)
			}
		})
	}
}

func TestTamperedConfirmation(t *testing.T) {
	s := register(t, "code", testCtx)
	prover, shareP, _ := NewProver(testCtx, s, rand.Reader)
	verifier, shareV, confirmV, err := NewVerifier(testCtx, s.VerifierRecord(), shareP, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), confirmV...)
	bad[0] ^= 1
	if _, _, err := prover.Finish(shareV, bad); !errors.Is(err, ErrConfirmation) {
		t.Fatalf("tampered confirmV: got %v", err)
	}
	if _, _, err := prover.Finish(shareV, confirmV); !errors.Is(err, ErrUsed) {
		t.Fatalf("second Finish: got %v, want ErrUsed", err)
	}
	if _, err := verifier.Finish(confirmV[:16]); !errors.Is(err, ErrConfirmation) {
		t.Fatalf("short confirmP: got %v", err)
	}
	if _, err := verifier.Finish(confirmV); !errors.Is(err, ErrUsed) {
		t.Fatalf("second verifier Finish: got %v, want ErrUsed", err)
	}
}

func TestInvalidSharesRefused(t *testing.T) {
	s := register(t, "code", testCtx)
	rec := s.VerifierRecord()
	g := nistec.NewP256Point().SetGenerator().Bytes()
	offCurve := append([]byte(nil), g...)
	offCurve[64] ^= 1
	bigX := append([]byte{4}, bytes.Repeat([]byte{0xff}, 64)...)
	// w0*M: shareP that cancels the mask, so Z would be the identity.
	cancelM := mul(pointM(), s.w0).Bytes()
	cancelN := mul(pointN(), s.w0).Bytes()
	cases := map[string]struct {
		share   []byte
		forBoth bool
	}{
		"empty":                 {nil, true},
		"identity encoding":     {[]byte{0}, true},
		"compressed":            {nistec.NewP256Point().SetGenerator().BytesCompressed(), true},
		"hybrid prefix 0x06":    {append([]byte{6}, g[1:]...), true},
		"truncated":             {g[:64], true},
		"too long":              {append(append([]byte(nil), g...), 0), true},
		"off curve":             {offCurve, true},
		"coordinate above p":    {bigX, true},
		"cancels M (verifier)":  {cancelM, false},
		"all zero uncompressed": {append([]byte{4}, make([]byte, 64)...), true},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			if err := ValidateShare(tc.share); tc.forBoth && !errors.Is(err, ErrInvalidShare) {
				t.Errorf("ValidateShare: got %v", err)
			}
			if _, _, _, err := NewVerifier(testCtx, rec, tc.share, rand.Reader); !errors.Is(err, ErrInvalidShare) {
				t.Errorf("verifier accepted shareP: %v", err)
			}
		})
	}
	for name, share := range map[string][]byte{"identity": {0}, "off curve": offCurve, "cancels N": cancelN, "compressed": g[:33]} {
		t.Run("prover "+name, func(t *testing.T) {
			p, _, _ := NewProver(testCtx, s, rand.Reader)
			if _, _, err := p.Finish(share, make([]byte, ConfirmSize)); !errors.Is(err, ErrInvalidShare) {
				t.Errorf("prover accepted shareV: %v", err)
			}
		})
	}
}

func TestSecretsAndRecords(t *testing.T) {
	s := register(t, "code", testCtx)
	b, _ := s.MarshalBinary()
	var s2 ProverSecret
	if err := s2.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.W0(), s2.W0()) || !bytes.Equal(s.W1(), s2.W1()) {
		t.Fatal("prover secret round trip changed it")
	}
	rb, _ := s.VerifierRecord().MarshalBinary()
	var r VerifierRecord
	if err := r.UnmarshalBinary(rb); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(s.VerifierRecord().L(), r.L()); diff != "" {
		t.Fatalf("record round trip (-want +got):\n%s", diff)
	}
	order := unhex(t, "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
	one := append(make([]byte, 31), 1)
	bad := map[string]func() error{
		"w0 zero":        func() error { _, err := NewProverSecret(make([]byte, 32), one); return err },
		"w1 = p":         func() error { _, err := NewProverSecret(one, order); return err },
		"w0 short":       func() error { _, err := NewProverSecret(one[:31], one); return err },
		"record L id":    func() error { _, err := NewVerifierRecord(one, []byte{0}); return err },
		"record short":   func() error { return new(VerifierRecord).UnmarshalBinary(rb[:96]) },
		"secret short":   func() error { return new(ProverSecret).UnmarshalBinary(b[:63]) },
		"pbkdf short":    func() error { _, err := ProverSecretFromPBKDF(make([]byte, 78)); return err },
		"pbkdf odd":      func() error { _, err := ProverSecretFromPBKDF(make([]byte, 81)); return err },
		"pbkdf zero w0":  func() error { _, err := ProverSecretFromPBKDF(make([]byte, 80)); return err },
		"register empty": func() error { _, err := Register(nil, make([]byte, 16), testCtx, fastKDF); return err },
		"register salt":  func() error { _, err := Register([]byte("x"), make([]byte, 15), testCtx, fastKDF); return err },
	}
	for name, f := range bad {
		if err := f(); !errors.Is(err, ErrInvalidSecret) {
			t.Errorf("%s: got %v, want ErrInvalidSecret", name, err)
		}
	}
}

func TestRegisterBindsSaltAndIdentities(t *testing.T) {
	a := register(t, "code", testCtx)
	if !bytes.Equal(a.W0(), register(t, "code", testCtx).W0()) {
		t.Fatal("registration is not deterministic")
	}
	other := testCtx
	other.ProverID = []byte("gateway-2")
	if bytes.Equal(a.W0(), register(t, "code", other).W0()) {
		t.Fatal("identities do not change w0")
	}
	b, err := Register([]byte("code"), []byte("fedcba9876543210"), testCtx, fastKDF)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a.W0(), b.W0()) {
		t.Fatal("salt does not change w0")
	}
}

func TestRegisterDefaultParams(t *testing.T) {
	if testing.Short() {
		t.Skip("32 MiB scrypt skipped in -short")
	}
	s, err := Register([]byte("12345-67890"), []byte("0123456789abcdef"), testCtx, DefaultKDFParams)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, perr, verr := run(t, s, testCtx, s.VerifierRecord(), testCtx); perr != nil || verr != nil {
		t.Fatal(perr, verr)
	}
}

func TestKDFParamsValidate(t *testing.T) {
	cases := map[string]struct {
		k    KDFParams
		want string // substring of the error, "" for valid
	}{
		"default":        {DefaultKDFParams, ""},
		"N not pow2":     {KDFParams{N: 1000, R: 8, P: 1}, "power of two"},
		"N one":          {KDFParams{N: 1, R: 8, P: 1}, "power of two"},
		"r zero":         {KDFParams{N: 1024, R: 0, P: 1}, "r >= 1"},
		"p zero":         {KDFParams{N: 1024, R: 8, P: 0}, "p >= 1"},
		"too much mem":   {KDFParams{N: 1 << 21, R: 8, P: 1}, "1 GiB"},
		"rp too large":   {KDFParams{N: 2, R: 1 << 15, P: 1 << 15}, "r*p < 2^30"},
		"small but fine": {fastKDF, ""},
	}
	for name, tc := range cases {
		err := tc.k.Validate()
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: unexpected error %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want error containing %q", name, err, tc.want)
		}
	}
}

// errReader fails every read.
type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("no entropy") }

func TestRandomnessFailure(t *testing.T) {
	s := register(t, "code", testCtx)
	if _, _, err := NewProver(testCtx, s, errReader{}); err == nil {
		t.Fatal("prover started without randomness")
	}
	// A source that only yields values >= p must not loop forever.
	if _, _, err := NewProver(testCtx, s, bytes.NewReader(bytes.Repeat([]byte{0xff}, 32*64))); err == nil {
		t.Fatal("prover accepted an out-of-range scalar")
	}
}

func BenchmarkFullExchange(b *testing.B) {
	s, _ := Register([]byte("code"), []byte("0123456789abcdef"), testCtx, fastKDF)
	rec := s.VerifierRecord()
	for b.Loop() {
		p, shareP, _ := NewProver(testCtx, s, rand.Reader)
		v, shareV, confirmV, _ := NewVerifier(testCtx, rec, shareP, rand.Reader)
		confirmP, _, err := p.Finish(shareV, confirmV)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := v.Finish(confirmP); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRegisterDefault(b *testing.B) {
	for b.Loop() {
		if _, err := Register([]byte("12345-67890"), []byte("0123456789abcdef"), testCtx, DefaultKDFParams); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzVerifierShareP feeds arbitrary shareP to the verifier: it must refuse
// or answer, never panic, and never accept a non-uncompressed encoding.
func FuzzVerifierShareP(f *testing.F) {
	v := vector(f)
	f.Add(unhex(f, v["shareP"]))
	f.Add(unhex(f, v["shareV"]))
	f.Add(unhex(f, v["L"]))
	f.Add([]byte{0})
	w0, w1 := unhex(f, v["w0"]), unhex(f, v["w1"])
	s, err := NewProverSecret(w0, w1)
	if err != nil {
		f.Fatal(err)
	}
	rec := s.VerifierRecord()
	c := vectorContext(v)
	f.Fuzz(func(t *testing.T, shareP []byte) {
		_, shareV, confirmV, err := NewVerifier(c, rec, shareP, rand.Reader)
		if err != nil {
			if !errors.Is(err, ErrInvalidShare) {
				t.Fatalf("refusal does not wrap ErrInvalidShare: %v", err)
			}
			return
		}
		if len(shareP) != ShareSize || shareP[0] != 4 || len(shareV) != ShareSize || len(confirmV) != ConfirmSize {
			t.Fatalf("accepted shareP %x, answered %d/%d bytes", shareP, len(shareV), len(confirmV))
		}
	})
}

// FuzzProverFinish feeds arbitrary shareV || confirmV to the prover of the
// RFC vector: only the vector's own answer may succeed.
func FuzzProverFinish(f *testing.F) {
	v := vector(f)
	f.Add(unhex(f, v["shareV"]), unhex(f, v["confirmV"]))
	f.Add(unhex(f, v["shareP"]), unhex(f, v["confirmP"]))
	f.Add([]byte{0}, []byte{})
	s, err := NewProverSecret(unhex(f, v["w0"]), unhex(f, v["w1"]))
	if err != nil {
		f.Fatal(err)
	}
	var x scalar
	copy(x[:], unhex(f, v["x"]))
	c := vectorContext(v)
	wantV, wantC := unhex(f, v["shareV"]), unhex(f, v["confirmV"])
	f.Fuzz(func(t *testing.T, shareV, confirmV []byte) {
		p, _, err := newProverWithScalar(c, s, x)
		if err != nil {
			t.Fatal(err)
		}
		_, key, err := p.Finish(shareV, confirmV)
		ok := bytes.Equal(shareV, wantV) && bytes.Equal(confirmV, wantC)
		if (err == nil) != ok {
			t.Fatalf("shareV %x confirmV %x: err %v, want success %v", shareV, confirmV, err, ok)
		}
		if err == nil && hex.EncodeToString(key) != v["K_shared"] {
			t.Fatalf("wrong key %x", key)
		}
	})
}

// TestReplayedMessagesFail: messages recorded from a completed run are
// useless against a new run, on either side, because each run draws
// fresh x and y.
func TestReplayedMessagesFail(t *testing.T) {
	s := register(t, "12345-67890", testCtx)
	rec := s.VerifierRecord()
	p1, shareP1, _ := NewProver(testCtx, s, rand.Reader)
	v1, shareV1, confirmV1, _ := NewVerifier(testCtx, rec, shareP1, rand.Reader)
	confirmP1, _, err := p1.Finish(shareV1, confirmV1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v1.Finish(confirmP1); err != nil {
		t.Fatal(err)
	}
	// An attacker replays the old prover's shareP and confirmP to a new
	// verifier run.
	v2, _, _, err := NewVerifier(testCtx, rec, shareP1, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v2.Finish(confirmP1); !errors.Is(err, ErrConfirmation) {
		t.Fatalf("replayed confirmP: %v", err)
	}
	// Or the old verifier's answer to a new prover run.
	p2, _, _ := NewProver(testCtx, s, rand.Reader)
	if _, _, err := p2.Finish(shareV1, confirmV1); !errors.Is(err, ErrConfirmation) {
		t.Fatalf("replayed shareV/confirmV: %v", err)
	}
}

func TestProverSetContext(t *testing.T) {
	s := register(t, "code", testCtx)
	p, shareP, _ := NewProver(Context{}, s, rand.Reader)
	v, shareV, confirmV, err := NewVerifier(testCtx, s.VerifierRecord(), shareP, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.SetContext(testCtx)
	confirmP, _, err := p.Finish(shareV, confirmV)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Finish(confirmP); err != nil {
		t.Fatal(err)
	}
}

// TestReduceMatchesBigInt checks the constant-time reduction against
// math/big on edge values and random ones.
func TestReduceMatchesBigInt(t *testing.T) {
	n := new(big.Int).SetBytes(orderBytes[:])
	pad := func(v *big.Int) []byte { return v.FillBytes(make([]byte, 40)) }
	inputs := [][]byte{
		pad(new(big.Int).Add(n, big.NewInt(1))),
		pad(new(big.Int).Sub(n, big.NewInt(1))),
		pad(new(big.Int).Mul(n, big.NewInt(0xffffffffff))),
		pad(new(big.Int).Add(new(big.Int).Mul(n, big.NewInt(0xffffffffff)), big.NewInt(5))),
		bytes.Repeat([]byte{0xff}, 40),
		bytes.Repeat([]byte{0xff}, 64),
		append(make([]byte, 39), 1),
	}
	for range 200 {
		b := make([]byte, 40)
		rand.Read(b)
		inputs = append(inputs, b)
	}
	for _, in := range inputs {
		want := new(big.Int).Mod(new(big.Int).SetBytes(in), n)
		got, err := reduce(in)
		if want.Sign() == 0 {
			if err == nil {
				t.Fatalf("%x reduces to zero but was accepted", in)
			}
			continue
		}
		if err != nil || new(big.Int).SetBytes(got[:]).Cmp(want) != 0 {
			t.Fatalf("reduce(%x) = %x, %v; want %x", in, got, err, want)
		}
	}
	if _, err := reduce(pad(new(big.Int).Mul(n, big.NewInt(3)))); !errors.Is(err, ErrInvalidSecret) {
		t.Fatalf("multiple of p: %v", err)
	}
	nm1 := new(big.Int).Sub(n, big.NewInt(1)).FillBytes(make([]byte, 32))
	if _, err := scalarFromBytes(nm1); err != nil {
		t.Fatalf("p-1 refused: %v", err)
	}
	if _, err := scalarFromBytes(orderBytes[:]); err == nil {
		t.Fatal("p accepted as a scalar")
	}
}

// BenchmarkECDHP256Reference is one P-256 ECDH exchange (two key
// generations, two shared-secret computations) with crypto/ecdh, run
// beside BenchmarkFullExchange so the cost of the PAKE reads as a ratio.
func BenchmarkECDHP256Reference(b *testing.B) {
	for b.Loop() {
		a, _ := ecdh.P256().GenerateKey(rand.Reader)
		c, _ := ecdh.P256().GenerateKey(rand.Reader)
		if _, err := a.ECDH(c.PublicKey()); err != nil {
			b.Fatal(err)
		}
		if _, err := c.ECDH(a.PublicKey()); err != nil {
			b.Fatal(err)
		}
	}
}
