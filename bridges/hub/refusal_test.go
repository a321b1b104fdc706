package hub

import (
	"crypto/x509"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/pki"
)

// Every sentinel error of package pki is counted under the reason of its
// name wherever CertRefusal names it (an MQTT handshake or CONNECT, a
// CoAP certificate past credentialRefusal's own checks), wrapped as pki
// wraps it. Before, pki.ErrCertExpired and pki.ErrClockNotSet were
// counted bad_certificate. The table must name every sentinel pki
// declares (the second part reads pki's source): one added there fails
// here until it has its reason.
func TestCertRefusalNamesPKISentinels(t *testing.T) {
	sentinels := map[string]struct {
		err  error
		want string
	}{
		"ErrRevoked":     {fmt.Errorf("device d certificate 01: %w", pki.ErrRevoked), ReasonRevoked},
		"ErrCertRetired": {fmt.Errorf("device d certificate 01: %w, refused as %w", pki.ErrCertRetired, pki.ErrRevoked), ReasonCertRetired},
		"ErrCertExpired": {fmt.Errorf("device d certificate 01: %w at 2030-01-02T03:04:05Z", pki.ErrCertExpired), ReasonExpired},
		"ErrClockNotSet": {fmt.Errorf("clock reads 1970-01-01T00:00:00Z, before 2025-01-01: %w", pki.ErrClockNotSet), ReasonClockNotSet},
	}
	for name, tc := range sentinels {
		if got := CertRefusal(tc.err); got != tc.want {
			t.Errorf("CertRefusal(pki.%s: %q) = %q, want %q", name, tc.err, got, tc.want)
		}
	}
	// What crypto/x509 finds wrong with a chain keeps its reasons.
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("device certificate %q not accepted: %w", "d", x509.CertificateInvalidError{Reason: x509.Expired}), ReasonExpired},
		{fmt.Errorf("device certificate %q not accepted: %w", "d", x509.UnknownAuthorityError{}), ReasonWrongCA},
		{fmt.Errorf("device certificate %q not accepted: %w", "d", x509.CertificateInvalidError{Reason: x509.IncompatibleUsage}), ReasonBadCert},
	} {
		if got := CertRefusal(tc.err); got != tc.want {
			t.Errorf("CertRefusal(%q) = %q, want %q", tc.err, got, tc.want)
		}
	}

	declared := pkiSentinels(t)
	for _, name := range declared {
		if _, ok := sentinels[name]; !ok {
			t.Errorf("pki.%s is not in this test's table: give it its reason in CertRefusal and here", name)
		}
	}
	if len(declared) < len(sentinels) {
		t.Errorf("pki declares the sentinels %v, fewer than this test's table has", declared)
	}
}

// pkiSentinels are the names of the package-level errors package pki
// declares with errors.New (its subpackages' are not certificate checks).
func pkiSentinels(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("..", "..", "pki", "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("pki's source: %v (%d files)", err, len(files))
	}
	var names []string
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range file.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, sp := range gd.Specs {
				vs := sp.(*ast.ValueSpec)
				for i, n := range vs.Names {
					if i < len(vs.Values) && strings.HasPrefix(n.Name, "Err") && isErrorsNew(vs.Values[i]) {
						names = append(names, n.Name)
					}
				}
			}
		}
	}
	return names
}

func isErrorsNew(e ast.Expr) bool {
	call, ok := e.(*ast.CallExpr)
	if !ok {
		return false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return false
	}
	pkg, ok := sel.X.(*ast.Ident)
	return ok && pkg.Name == "errors" && sel.Sel.Name == "New"
}
