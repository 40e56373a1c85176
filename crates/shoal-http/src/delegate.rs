//! Connection wrappers that pass reads and writes through to the
//! connection they wrap: [`delegate_io!`](crate::delegate_io) implements
//! tokio's `AsyncRead` and `AsyncWrite` for one, and
//! [`delegate_write!`](crate::delegate_write) `AsyncWrite` alone (for a
//! wrapper that reads its own way). The wrapper is generic over its
//! connection `I` and keeps it, `Unpin`, in the field named.

/// Implements `AsyncWrite` for `$wrapper<I>` by passing every call to its
/// field `$field` (see the module doc).
#[macro_export]
macro_rules! delegate_write {
    ($wrapper:ident, $field:tt) => {
        impl<I: ::tokio::io::AsyncWrite + ::std::marker::Unpin> ::tokio::io::AsyncWrite
            for $wrapper<I>
        {
            fn poll_write(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

/// Implements `AsyncRead` and `AsyncWrite` for `$wrapper<I>` by passing
/// every call to its field `$field` (see the module doc).
#[macro_export]
macro_rules! delegate_io {
    ($wrapper:ident, $field:tt) => {
        impl<I: ::tokio::io::AsyncRead + ::std::marker::Unpin> ::tokio::io::AsyncRead
            for $wrapper<I>
        {
            fn poll_read(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.$field).poll_read(cx, buf)
            }
        }

        $crate::delegate_write!($wrapper, $field);
    };
}
