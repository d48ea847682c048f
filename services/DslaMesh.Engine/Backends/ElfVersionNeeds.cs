using System.Buffers.Binary;
using System.Text;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// Reads and edits the version-needs table (<c>.gnu.version_r</c>) of a 64-bit little-endian ELF shared library.
/// </summary>
/// <remarks>
/// TorchSharp 0.107's <c>libLibTorchSharp.so</c> asks for <c>GLIBCXX_3.4.32</c> only for
/// <c>std::ios_base_library_init</c>, which it never calls; Debian 12's libstdc++ stops at 3.4.30, so the loader
/// refuses the library. Setting <c>VER_FLG_WEAK</c> on such an entry turns the hard failure into nothing at all
/// (glibc only warns about weak version needs under <c>LD_DEBUG</c>).
/// </remarks>
public static class ElfVersionNeeds
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const uint ShtGnuVerdef = 0x6ffffffd;
    private const ushort VerFlagWeak = 0x2;

    /// <summary>One version a library needs from another.</summary>
    /// <param name="File">The library that must provide it (for example <c>libstdc++.so.6</c>).</param>
    /// <param name="Version">The version name (for example <c>GLIBCXX_3.4.32</c>).</param>
    /// <param name="IsWeak">Whether a missing version is tolerated.</param>
    /// <param name="FlagsOffset">File offset of the entry's 16-bit flags.</param>
    public sealed record Need(string File, string Version, bool IsWeak, long FlagsOffset);

    /// <summary>Lists the version needs of an ELF image.</summary>
    public static IReadOnlyList<Need> ReadNeeds(ReadOnlySpan<byte> elf)
    {
        var needs = new List<Need>();
        foreach (var (offset, size, info, strtab) in Sections(elf, ShtGnuVerneed))
        {
            _ = size;
            var entry = offset;
            for (var i = 0; i < info; i++)
            {
                var count = U16(elf, entry + 2);
                var file = CString(elf, strtab + U32(elf, entry + 4));
                var aux = entry + U32(elf, entry + 8);
                for (var j = 0; j < count; j++)
                {
                    var flags = U16(elf, aux + 4);
                    var name = CString(elf, strtab + U32(elf, aux + 8));
                    needs.Add(new Need(file, name, (flags & VerFlagWeak) != 0, aux + 4));
                    var nextAux = U32(elf, aux + 12);
                    if (nextAux == 0)
                    {
                        break;
                    }
                    aux += nextAux;
                }
                var next = U32(elf, entry + 12);
                if (next == 0)
                {
                    break;
                }
                entry += next;
            }
        }
        return needs;
    }

    /// <summary>Lists the versions an ELF library defines (its <c>.gnu.version_d</c>).</summary>
    public static IReadOnlySet<string> ReadDefinitions(ReadOnlySpan<byte> elf)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (offset, _, info, strtab) in Sections(elf, ShtGnuVerdef))
        {
            var entry = offset;
            for (var i = 0; i < info; i++)
            {
                var aux = entry + U32(elf, entry + 12);
                names.Add(CString(elf, strtab + U32(elf, aux)));
                var next = U32(elf, entry + 16);
                if (next == 0)
                {
                    break;
                }
                entry += next;
            }
        }
        return names;
    }

    /// <summary>Marks the given needs weak in place.</summary>
    public static void MarkWeak(Span<byte> elf, IEnumerable<Need> needs)
    {
        foreach (var need in needs)
        {
            var slot = elf.Slice(checked((int)need.FlagsOffset), 2);
            BinaryPrimitives.WriteUInt16LittleEndian(slot, (ushort)(BinaryPrimitives.ReadUInt16LittleEndian(slot) | VerFlagWeak));
        }
    }

    private static List<(long Offset, long Size, uint Info, long StrtabOffset)> Sections(ReadOnlySpan<byte> elf, uint type)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
        {
            throw new InvalidDataException("Not an ELF file.");
        }
        if (elf[4] != 2 || elf[5] != 1)
        {
            throw new InvalidDataException("Only 64-bit little-endian ELF files are supported.");
        }
        var shoff = (long)U64(elf, 0x28);
        var shentsize = U16(elf, 0x3a);
        var shnum = U16(elf, 0x3c);
        var found = new List<(long, long, uint, long)>();
        for (var i = 0; i < shnum; i++)
        {
            var sh = shoff + (i * shentsize);
            if (U32(elf, sh + 4) != type)
            {
                continue;
            }
            var link = U32(elf, sh + 0x28);
            var strtab = (long)U64(elf, shoff + (link * shentsize) + 0x18);
            found.Add(((long)U64(elf, sh + 0x18), (long)U64(elf, sh + 0x20), U32(elf, sh + 0x2c), strtab));
        }
        return found;
    }

    private static ushort U16(ReadOnlySpan<byte> b, long at) => BinaryPrimitives.ReadUInt16LittleEndian(b[checked((int)at)..]);

    private static uint U32(ReadOnlySpan<byte> b, long at) => BinaryPrimitives.ReadUInt32LittleEndian(b[checked((int)at)..]);

    private static ulong U64(ReadOnlySpan<byte> b, long at) => BinaryPrimitives.ReadUInt64LittleEndian(b[checked((int)at)..]);

    private static string CString(ReadOnlySpan<byte> b, long at)
    {
        var start = b[checked((int)at)..];
        var end = start.IndexOf((byte)0);
        return Encoding.ASCII.GetString(end < 0 ? start : start[..end]);
    }
}
